// The span API: argument checks, the per-step constants, the finiteness pre-scan and the
// parallel loop over tiles. The arithmetic itself is in kernel_loops.h.

#include <cmath>
#include <optional>
#include <vector>

#include "ferry/check.h"
#include "ferry/optim.h"
#include "optim/dispatch.h"
#include "optim/kernels.h"

namespace ferry::optim {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "f32";
    case DType::kBF16: return "bf16";
    case DType::kF16: return "f16";
  }
  return "unknown";
}

namespace {

using detail::Tile;

bool known_dtype(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16;
}

void check_span(const char* op, const char* name, const void* data, std::int64_t size,
                std::int64_t master_size) {
  FERRY_CHECK(size == master_size, op, ": ", name, " has ", size, " elements but master has ",
              master_size, "; every span of one step must have the same length");
  FERRY_CHECK(data != nullptr || size == 0, op, ": ", name, " is null but has ", size,
              " elements");
}

void check_spans(const char* op, FloatSpan master, const GradSpan& grad, const OutputSpan& out) {
  FERRY_CHECK(master.size >= 0, op, ": master has a negative length ", master.size);
  check_span(op, "master", master.data, master.size, master.size);
  check_span(op, "grad", grad.data, grad.size, master.size);
  FERRY_CHECK(known_dtype(grad.dtype), op, ": grad dtype ", static_cast<int>(grad.dtype),
              " is unsupported; valid: f32, bf16, f16");
  if (out.data != nullptr) {
    check_span(op, "out", out.data, out.size, master.size);
    FERRY_CHECK(out.dtype == DType::kBF16 || out.dtype == DType::kF16, op, ": out dtype ",
                known_dtype(out.dtype) ? dtype_name(out.dtype) : "unknown",
                " is unsupported; the low-precision copy is bf16 or f16");
  }
}

void check_context(const char* op, const StepContext& context) {
  FERRY_CHECK(context.step >= 1, op, ": step ", context.step, " is invalid; steps count from 1");
  FERRY_CHECK(std::isfinite(context.grad_scale) && context.grad_scale > 0, op, ": grad_scale ",
              context.grad_scale, " is invalid; it must be finite and > 0");
  FERRY_CHECK(std::isfinite(context.clip_coef) && context.clip_coef > 0, op, ": clip_coef ",
              context.clip_coef, " is invalid; it must be finite and > 0");
}

void check_at_least_zero(const char* op, const char* name, double value) {
  FERRY_CHECK(value >= 0 && std::isfinite(value), op, ": ", name, " = ", value,
              " is invalid; it must be finite and >= 0");
}

void check_beta(const char* op, const char* name, double value) {
  FERRY_CHECK(value >= 0 && value < 1, op, ": ", name, " = ", value,
              " is invalid; it must be in [0, 1)");
}

void check_eps(const char* op, double eps) {
  FERRY_CHECK(eps > 0 && std::isfinite(eps), op, ": eps = ", eps,
              " is invalid; it must be finite and > 0");
}

// Adam and AdamW take the same settings with the same ranges.
template <class Params>
void check_adam_family(const char* name, const Params& params) {
  check_at_least_zero(name, "lr", params.lr);
  check_beta(name, "beta1", params.beta1);
  check_beta(name, "beta2", params.beta2);
  check_eps(name, params.eps);
  check_at_least_zero(name, "weight_decay", params.weight_decay);
}

float grad_multiplier(const StepContext& context) {
  return static_cast<float>(context.clip_coef / context.grad_scale);
}

detail::AdamConstants adam_constants(double lr, double beta1, double beta2, double eps,
                                     const StepContext& context) {
  const double step = static_cast<double>(context.step);
  const double bias_correction1 = 1 - std::pow(beta1, step);
  const double bias_correction2 = 1 - std::pow(beta2, step);
  detail::AdamConstants c{};
  c.grad_multiplier = grad_multiplier(context);
  c.l2 = 0.0f;
  c.decay = 1.0f;
  c.beta1 = static_cast<float>(beta1);
  c.one_minus_beta1 = static_cast<float>(1 - beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1 - beta2);
  c.sqrt_bias_correction2 = static_cast<float>(std::sqrt(bias_correction2));
  c.eps = static_cast<float>(eps);
  c.neg_step_size = static_cast<float>(-(lr / bias_correction1));
  return c;
}

// Skips the step when the gradient is not known to be finite and is not; otherwise runs
// tile_step on every tile.
template <class TileStep>
StepReport run_step(const StepContext& context, const GradSpan& grad, const TileStep& tile_step) {
  if (!context.grad_checked_finite && !grad_stats(grad).finite) {
    return StepReport{true};
  }
  const detail::KernelTable& kernels = detail::active_kernels();
  detail::parallel_tiles(grad.size, [&](Tile tile) { tile_step(kernels, tile); });
  return StepReport{false};
}

}  // namespace

void check_params(const AdamWParams& params) { check_adam_family("AdamW", params); }

void check_params(const AdamParams& params) { check_adam_family("Adam", params); }

void check_params(const SgdParams& params) {
  constexpr const char* kName = "SGD";
  check_at_least_zero(kName, "lr", params.lr);
  check_at_least_zero(kName, "momentum", params.momentum);
  check_at_least_zero(kName, "weight_decay", params.weight_decay);
  FERRY_CHECK(std::isfinite(params.dampening), kName, ": dampening = ", params.dampening,
              " is invalid; it must be finite");
  FERRY_CHECK(!params.nesterov || (params.momentum > 0 && params.dampening == 0), kName,
              ": nesterov needs momentum > 0 and dampening = 0, got momentum = ", params.momentum,
              " and dampening = ", params.dampening);
}

void check_params(const AdagradParams& params) {
  constexpr const char* kName = "Adagrad";
  check_at_least_zero(kName, "lr", params.lr);
  check_at_least_zero(kName, "lr_decay", params.lr_decay);
  check_at_least_zero(kName, "weight_decay", params.weight_decay);
  check_eps(kName, params.eps);
}

namespace {

// Adam and AdamW run one kernel; they differ in where weight decay enters the constants. With a
// CUDA stream the spans are device memory and the step is queued there.
template <class Params>
StepReport adam_family_step(const char* op, const Params& params, const StepContext& context,
                            FloatSpan master, FloatSpan exp_avg, FloatSpan exp_avg_sq,
                            GradSpan grad, OutputSpan out, bool decoupled_decay,
                            std::optional<void*> cuda_stream) {
  check_spans(op, master, grad, out);
  check_span(op, "exp_avg", exp_avg.data, exp_avg.size, master.size);
  check_span(op, "exp_avg_sq", exp_avg_sq.data, exp_avg_sq.size, master.size);
  check_context(op, context);
  check_params(params);

  detail::AdamConstants c =
      adam_constants(params.lr, params.beta1, params.beta2, params.eps, context);
  if (decoupled_decay) {
    c.decay = static_cast<float>(1 - params.lr * params.weight_decay);
  } else {
    c.l2 = static_cast<float>(params.weight_decay);
  }
  if (!cuda_stream) {
    return run_step(context, grad, [&](const detail::KernelTable& kernels, Tile tile) {
      kernels.adam(c, master.data, exp_avg.data, exp_avg_sq.data, grad, out, tile);
    });
  }
  FERRY_CHECK(context.grad_checked_finite, op, "_cuda: the gradient must be known finite ",
              "(StepContext::grad_checked_finite): a device step cannot skip a span it has begun to write");
#ifdef FERRY_WITH_CUDA
  const int error = detail::launch_adam(c, master.data, exp_avg.data, exp_avg_sq.data, grad, out, *cuda_stream);
  FERRY_CHECK(error == 0, op, "_cuda: the kernel failed to launch (cudaError_t ", error, ")");
  return StepReport{false};
#else
  throw Error(ferry::detail::concat(op, "_cuda: this ferry was built without CUDA"));
#endif
}

}  // namespace

StepReport adamw_step(const AdamWParams& params, const StepContext& context, FloatSpan master,
                      FloatSpan exp_avg, FloatSpan exp_avg_sq, GradSpan grad, OutputSpan out) {
  return adam_family_step("adamw_step", params, context, master, exp_avg, exp_avg_sq, grad, out,
                          /*decoupled_decay=*/true, std::nullopt);
}

StepReport adam_step(const AdamParams& params, const StepContext& context, FloatSpan master,
                     FloatSpan exp_avg, FloatSpan exp_avg_sq, GradSpan grad, OutputSpan out) {
  return adam_family_step("adam_step", params, context, master, exp_avg, exp_avg_sq, grad, out,
                          /*decoupled_decay=*/false, std::nullopt);
}

void adamw_step_cuda(const AdamWParams& params, const StepContext& context, FloatSpan master,
                     FloatSpan exp_avg, FloatSpan exp_avg_sq, GradSpan grad, OutputSpan out, void* cuda_stream) {
  adam_family_step("adamw_step", params, context, master, exp_avg, exp_avg_sq, grad, out,
                   /*decoupled_decay=*/true, cuda_stream);
}

void adam_step_cuda(const AdamParams& params, const StepContext& context, FloatSpan master,
                    FloatSpan exp_avg, FloatSpan exp_avg_sq, GradSpan grad, OutputSpan out, void* cuda_stream) {
  adam_family_step("adam_step", params, context, master, exp_avg, exp_avg_sq, grad, out,
                   /*decoupled_decay=*/false, cuda_stream);
}

StepReport sgd_step(const SgdParams& params, const StepContext& context, FloatSpan master,
                    FloatSpan momentum_buffer, GradSpan grad, OutputSpan out) {
  constexpr const char* kOp = "sgd_step";
  check_spans(kOp, master, grad, out);
  check_context(kOp, context);
  check_params(params);
  const bool use_momentum = params.momentum != 0;
  if (use_momentum) {
    check_span(kOp, "momentum_buffer", momentum_buffer.data, momentum_buffer.size, master.size);
  }

  detail::SgdConstants c{};
  c.grad_multiplier = grad_multiplier(context);
  c.weight_decay = static_cast<float>(params.weight_decay);
  c.momentum = static_cast<float>(params.momentum);
  c.one_minus_dampening = static_cast<float>(1 - params.dampening);
  c.neg_lr = static_cast<float>(-params.lr);
  c.use_momentum = use_momentum;
  c.first_step = context.step == 1;
  c.nesterov = params.nesterov;
  return run_step(context, grad, [&](const detail::KernelTable& kernels, Tile tile) {
    kernels.sgd(c, master.data, momentum_buffer.data, grad, out, tile);
  });
}

StepReport adagrad_step(const AdagradParams& params, const StepContext& context,
                        FloatSpan master, FloatSpan state_sum, GradSpan grad, OutputSpan out) {
  constexpr const char* kOp = "adagrad_step";
  check_spans(kOp, master, grad, out);
  check_span(kOp, "state_sum", state_sum.data, state_sum.size, master.size);
  check_context(kOp, context);
  check_params(params);

  detail::AdagradConstants c{};
  c.grad_multiplier = grad_multiplier(context);
  c.weight_decay = static_cast<float>(params.weight_decay);
  c.eps = static_cast<float>(params.eps);
  const double clr =
      params.lr / (1 + static_cast<double>(context.step - 1) * params.lr_decay);
  c.neg_clr = static_cast<float>(-clr);
  return run_step(context, grad, [&](const detail::KernelTable& kernels, Tile tile) {
    kernels.adagrad(c, master.data, state_sum.data, grad, out, tile);
  });
}

GradStats grad_stats(GradSpan grad) {
  FERRY_CHECK(grad.size >= 0, "grad_stats: grad has a negative length ", grad.size);
  FERRY_CHECK(grad.data != nullptr || grad.size == 0, "grad_stats: grad is null but has ",
              grad.size, " elements");
  FERRY_CHECK(known_dtype(grad.dtype), "grad_stats: grad dtype ", static_cast<int>(grad.dtype),
              " is unsupported; valid: f32, bf16, f16");
  const detail::KernelTable& kernels = detail::active_kernels();
  std::vector<double> tile_sums((grad.size + detail::kTileElements - 1) / detail::kTileElements);
  detail::parallel_tiles(grad.size, [&](Tile tile) {
    tile_sums[tile.begin / detail::kTileElements] = kernels.sum_squares(grad, tile);
  });
  double sum_squares = 0.0;
  for (double tile_sum : tile_sums) sum_squares += tile_sum;
  return GradStats{sum_squares, std::isfinite(sum_squares)};
}

void grad_stats_cuda(GradSpan grad, double* stats, void* cuda_stream) {
  FERRY_CHECK(grad.size >= 0 && (grad.data != nullptr || grad.size == 0),
              "grad_stats_cuda: grad of ", grad.size, " elements at ", grad.data, " is not a span");
  FERRY_CHECK(known_dtype(grad.dtype), "grad_stats_cuda: grad dtype ", static_cast<int>(grad.dtype),
              " is unsupported; valid: f32, bf16, f16");
  FERRY_CHECK(stats != nullptr, "grad_stats_cuda needs ", kGradStatsCudaDoubles, " device doubles for stats");
#ifdef FERRY_WITH_CUDA
  const int error = detail::launch_grad_stats(grad, stats, cuda_stream);
  FERRY_CHECK(error == 0, "grad_stats_cuda: the kernel failed to launch (cudaError_t ", error, ")");
#else
  (void)cuda_stream;
  throw Error("grad_stats_cuda: this ferry was built without CUDA");
#endif
}

}  // namespace ferry::optim
