#include "engine/update.h"

#include <cmath>

#include "ferry/check.h"

#if FERRY_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace ferry::detail {
namespace {

optim::DType span_dtype(const torch::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case torch::kFloat: return optim::DType::kF32;
    case torch::kBFloat16: return optim::DType::kBF16;
    case torch::kHalf: return optim::DType::kF16;
    default:
      throw Error(detail::concat("gradients must be fp32, bf16 or fp16; got ",
                                 tensor.scalar_type()));
  }
}

optim::FloatSpan float_span(const torch::Tensor& tensor, std::int64_t begin, std::int64_t size) {
  return {tensor.data_ptr<float>() + begin, size};
}

optim::GradSpan grad_span(const torch::Tensor& grad, std::int64_t begin, std::int64_t size) {
  const auto* base = static_cast<const char*>(grad.data_ptr());
  return {base + begin * grad.element_size(), size, span_dtype(grad)};
}

optim::OutputSpan output_span(const torch::Tensor& output, std::int64_t begin, std::int64_t size) {
  if (!output.defined()) return {};
  auto* base = static_cast<std::uint16_t*>(output.data_ptr());
  return {base + begin, size, span_dtype(output)};
}

// One contiguous range of a part, with one weight decay, through ferry's CPU kernels.
bool cpu_update(const OptimizerConfig& config, const optim::StepContext& context,
                PartUpdate& part, std::int64_t begin, std::int64_t size, double weight_decay) {
  optim::FloatSpan master = float_span(part.master, begin, size);
  optim::GradSpan grad = grad_span(part.grad, begin, size);
  optim::OutputSpan out = output_span(part.output, begin, size);
  auto state = [&](int i) { return float_span(part.states[static_cast<size_t>(i)], begin, size); };
  switch (config.kind) {
    case OptimizerKind::kAdamW:
      return optim::adamw_step({config.lr, config.beta1, config.beta2, config.eps, weight_decay},
                               context, master, state(0), state(1), grad, out)
          .skipped;
    case OptimizerKind::kAdam:
      return optim::adam_step({config.lr, config.beta1, config.beta2, config.eps, weight_decay},
                              context, master, state(0), state(1), grad, out)
          .skipped;
    case OptimizerKind::kSgd:
      return optim::sgd_step({config.lr, config.momentum, 0.0, weight_decay, config.nesterov},
                             context, master, config.momentum != 0 ? state(0) : optim::FloatSpan{},
                             grad, out)
          .skipped;
    case OptimizerKind::kAdagrad:
      return optim::adagrad_step({config.lr, 0.0, weight_decay, config.eps}, context, master,
                                 state(0), grad, out)
          .skipped;
  }
  return false;
}

// The same update for a CUDA device. Adam and AdamW run ferry's own kernel: one pass that reads
// the gradient in its dtype and writes the master, the moments and the modules' low-precision
// copy, with the CPU kernels' arithmetic, so the gpu mode gives the offload modes' bits. The
// other optimizers run torch ops in the CPU kernels' order of fp32 operations (docs/optim.md).
// The caller has checked the gradient finite.
void device_update(const OptimizerConfig& config, const optim::StepContext& context,
                   PartUpdate& part, std::int64_t begin, std::int64_t size, double weight_decay) {
  torch::NoGradGuard no_grad;
  if (config.kind == OptimizerKind::kAdamW || config.kind == OptimizerKind::kAdam) {
#if FERRY_WITH_CUDA
    optim::StepContext checked = context;
    checked.grad_checked_finite = true;
    void* stream = c10::cuda::getCurrentCUDAStream(part.master.device().index()).stream();
    const optim::FloatSpan master = float_span(part.master, begin, size);
    const optim::FloatSpan exp_avg = float_span(part.states[0], begin, size);
    const optim::FloatSpan exp_avg_sq = float_span(part.states[1], begin, size);
    const optim::GradSpan grad = grad_span(part.grad, begin, size);
    const optim::OutputSpan output = output_span(part.output, begin, size);
    if (config.kind == OptimizerKind::kAdamW) {
      optim::adamw_step_cuda({config.lr, config.beta1, config.beta2, config.eps, weight_decay}, checked, master,
                             exp_avg, exp_avg_sq, grad, output, stream);
    } else {
      optim::adam_step_cuda({config.lr, config.beta1, config.beta2, config.eps, weight_decay}, checked, master,
                            exp_avg, exp_avg_sq, grad, output, stream);
    }
    return;
#else
    throw Error("a device optimizer step needs a build of ferry with CUDA");
#endif
  }
  FERRY_CHECK(config.kind == OptimizerKind::kSgd, to_string(config.kind), " runs only where the optimizer state is ",
              "in host memory: use the zero-offload mode, or adamw, adam or sgd in the gpu mode on a CUDA device");
  torch::Tensor p = part.master.narrow(0, begin, size);
  torch::Tensor g = part.grad.narrow(0, begin, size).to(torch::kFloat) *
                    static_cast<float>(context.clip_coef / context.grad_scale);
  if (weight_decay != 0) g = g + static_cast<float>(weight_decay) * p;
  if (config.momentum != 0) {
    torch::Tensor buffer = part.states[0].narrow(0, begin, size);
    buffer.copy_(context.step == 1 ? g : buffer * static_cast<float>(config.momentum) + g);
    g = config.nesterov ? g + static_cast<float>(config.momentum) * buffer : buffer.clone();
  }
  p.copy_(p + static_cast<float>(-config.lr) * g);
  if (part.output.defined()) part.output.narrow(0, begin, size).copy_(p);
}

// [sum of squares, non-finite flag] as fp64 on the gradient's device.
torch::Tensor device_gradient_stats(const torch::Tensor& grad) {
  torch::NoGradGuard no_grad;
#if FERRY_WITH_CUDA
  // Note: torch's norm with an fp64 result converts the whole gradient to an fp64 copy first
  // (10 ms a step over 1.35B bf16 parameters on an H100); ferry's kernel reads it once.
  torch::Tensor stats = torch::empty({optim::kGradStatsCudaDoubles}, grad.options().dtype(torch::kDouble));
  void* stream = c10::cuda::getCurrentCUDAStream(grad.device().index()).stream();
  optim::grad_stats_cuda(grad_span(grad, 0, grad.numel()), stats.data_ptr<double>(), stream);
  return stats.narrow(0, 0, 2);
#else
  throw Error(detail::concat("a gradient on ", grad.device(), " needs a ferry built with CUDA"));
#endif
}

}  // namespace

double scheduled_lr(const ScheduleConfig& schedule, double base_lr, std::int64_t step) {
  if (schedule.warmup_steps > 0 && step <= schedule.warmup_steps) {
    return base_lr * static_cast<double>(step) / static_cast<double>(schedule.warmup_steps);
  }
  if (schedule.kind == LrSchedule::kConstant) return base_lr;
  const double span = static_cast<double>(std::max<std::int64_t>(
      1, schedule.total_steps - schedule.warmup_steps));
  const double progress = std::min(
      1.0, static_cast<double>(step - schedule.warmup_steps) / span);
  const double floor = base_lr * schedule.min_lr_ratio;
  const double shape = schedule.kind == LrSchedule::kLinear
                           ? 1.0 - progress
                           : 0.5 * (1.0 + std::cos(M_PI * progress));
  return floor + (base_lr - floor) * shape;
}

int optimizer_state_count(const OptimizerConfig& config) {
  switch (config.kind) {
    case OptimizerKind::kAdamW:
    case OptimizerKind::kAdam: return 2;
    case OptimizerKind::kSgd: return config.momentum != 0 ? 1 : 0;
    case OptimizerKind::kAdagrad: return 1;
  }
  return 0;
}

void validate(const OptimizerConfig& config) {
  switch (config.kind) {
    case OptimizerKind::kAdamW:
      optim::check_params(optim::AdamWParams{config.lr, config.beta1, config.beta2, config.eps,
                                             config.weight_decay});
      break;
    case OptimizerKind::kAdam:
      optim::check_params(optim::AdamParams{config.lr, config.beta1, config.beta2, config.eps,
                                            config.weight_decay});
      break;
    case OptimizerKind::kSgd:
      optim::check_params(optim::SgdParams{config.lr, config.momentum, 0.0, config.weight_decay,
                                           config.nesterov});
      break;
    case OptimizerKind::kAdagrad:
      optim::check_params(
          optim::AdagradParams{config.lr, 0.0, config.weight_decay, config.eps});
      break;
  }
}

bool apply_update(const OptimizerConfig& config, const UpdateContext& context, PartUpdate& part) {
  OptimizerConfig scheduled = config;
  scheduled.lr = context.lr;
  optim::StepContext step{context.step, context.grad_scale, context.clip_coef,
                          context.grad_checked_finite};
  const std::int64_t numel = part.master.numel();
  const std::int64_t decay = part.decay_numel;
  if (part.master.device().is_cpu()) {
    bool skipped = decay > 0 && cpu_update(scheduled, step, part, 0, decay, config.weight_decay);
    if (!skipped && numel > decay) skipped = cpu_update(scheduled, step, part, decay, numel - decay, 0.0);
    return skipped;
  }
  if (!context.grad_checked_finite && !gradient_stats(part.grad).finite) return true;
  if (decay > 0) device_update(scheduled, step, part, 0, decay, config.weight_decay);
  if (numel > decay) device_update(scheduled, step, part, decay, numel - decay, 0.0);
  return false;
}

optim::GradStats gradient_stats(const torch::Tensor& grad) {
  if (grad.device().is_cpu()) return optim::grad_stats(grad_span(grad, 0, grad.numel()));
  return measured_stats(device_gradient_stats(grad).to(torch::kCPU));
}

torch::Tensor measure_on_device(const torch::Tensor& grad) {
  FERRY_CHECK(grad.is_cuda(), "measure_on_device takes a CUDA gradient; got one on ", grad.device());
  torch::Tensor measured = torch::empty({2}, torch::TensorOptions(torch::kDouble).pinned_memory(true));
  measured.copy_(device_gradient_stats(grad), /*non_blocking=*/true);
  return measured;
}

optim::GradStats measured_stats(const torch::Tensor& measured) {
  const double* values = measured.data_ptr<double>();
  return {values[0], values[1] == 0};
}

void wait_for_current_stream(torch::Device device) {
#if FERRY_WITH_CUDA
  if (device.is_cuda()) c10::cuda::getCurrentCUDAStream(device.index()).synchronize();
#else
  (void)device;
#endif
}

LossScaler::LossScaler(const LossScaleConfig& config, bool enabled)
    : config_(config), enabled_(enabled), scale_(config.initial_scale) {
  FERRY_CHECK(config.initial_scale > 0 && std::isfinite(config.initial_scale),
              "loss scale initial_scale = ", config.initial_scale, " must be finite and > 0");
  FERRY_CHECK(config.growth_factor > 1, "loss scale growth_factor = ", config.growth_factor,
              " must be > 1");
  FERRY_CHECK(config.backoff_factor > 0 && config.backoff_factor < 1,
              "loss scale backoff_factor = ", config.backoff_factor, " must be in (0, 1)");
  FERRY_CHECK(config.growth_interval >= 1, "loss scale growth_interval = ",
              config.growth_interval, " must be >= 1");
}

void LossScaler::update(bool overflow) {
  if (!enabled_) return;
  if (overflow) {
    scale_ *= config_.backoff_factor;
    clean_steps_ = 0;
  } else if (++clean_steps_ >= config_.growth_interval) {
    scale_ *= config_.growth_factor;
    clean_steps_ = 0;
  }
}

void LossScaler::restore(double scale, std::int64_t clean_steps) {
  scale_ = scale;
  clean_steps_ = clean_steps;
}

}  // namespace ferry::detail
