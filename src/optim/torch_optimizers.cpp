// The torch::optim adapters: torch's options and per-parameter state, ferry's span kernels.

#include <torch/optim/serialize.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <memory>
#include <sstream>
#include <string>
#include <type_traits>

#include "ferry/check.h"
#include "ferry/torch_optim.h"

namespace ferry {
namespace {

using torch::optim::OptimizerOptions;
using torch::optim::OptimizerParamGroup;

std::string describe(const torch::Tensor& tensor) {
  std::ostringstream out;
  out << "of shape " << tensor.sizes();
  return out.str();
}

void check_cpu_contiguous(const char* who, const char* what, const torch::Tensor& tensor) {
  FERRY_CHECK(tensor.defined(), who, ": ", what, " is undefined");
  FERRY_CHECK(tensor.device().is_cpu(), who, ": ", what, " ", describe(tensor), " is on ",
              tensor.device(), "; ferry's CPU optimizers need CPU tensors");
  FERRY_CHECK(tensor.layout() == torch::kStrided, who, ": ", what, " ", describe(tensor),
              " has layout ", tensor.layout(), "; only dense (strided) tensors are supported");
  FERRY_CHECK(tensor.is_contiguous(), who, ": ", what, " ", describe(tensor),
              " is not contiguous; ferry's CPU optimizers work on contiguous tensors");
}

// A parameter or one of its optimizer states, as an fp32 span updated in place.
optim::FloatSpan float_span(const char* who, const char* what, const torch::Tensor& tensor) {
  check_cpu_contiguous(who, what, tensor);
  FERRY_CHECK(tensor.scalar_type() == torch::kFloat, who, ": ", what, " ", describe(tensor),
              " has dtype ", tensor.scalar_type(), "; it must be float32");
  return optim::FloatSpan{tensor.data_ptr<float>(), tensor.numel()};
}

optim::GradSpan grad_span(const char* who, const torch::Tensor& grad,
                          const torch::Tensor& param) {
  check_cpu_contiguous(who, "gradient", grad);
  FERRY_CHECK(grad.numel() == param.numel(), who, ": gradient ", describe(grad),
              " does not match its parameter ", describe(param));
  switch (grad.scalar_type()) {
    case torch::kFloat:
      return optim::GradSpan::f32(grad.data_ptr<float>(), grad.numel());
    case torch::kBFloat16:
      return optim::GradSpan::bf16(static_cast<const std::uint16_t*>(grad.data_ptr()),
                                   grad.numel());
    case torch::kHalf:
      return optim::GradSpan::f16(static_cast<const std::uint16_t*>(grad.data_ptr()),
                                  grad.numel());
    default:
      FERRY_CHECK(false, who, ": gradient ", describe(grad), " has dtype ", grad.scalar_type(),
                  "; gradients must be float32, bfloat16 or float16");
  }
  return {};
}

// Note: LibTorch keys optimizer state by the parameter's TensorImpl, as a string in 1.x and as
// the pointer itself in 2.x; the key type of the map says which.
template <class StateMap>
typename StateMap::key_type state_key(const StateMap&, const torch::Tensor& param) {
  using Key = typename StateMap::key_type;
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream key;
    key << param.unsafeGetTensorImpl();
    return key.str();
  } else {
    return param.unsafeGetTensorImpl();
  }
}

// The parameter's state, created by make_state() on first use.
template <class State, class StateMap, class MakeState>
State& state_for(StateMap& states, const torch::Tensor& param, const MakeState& make_state) {
  auto key = state_key(states, param);
  auto found = states.find(key);
  if (found == states.end()) {
    found = states.emplace(std::move(key), make_state()).first;
  }
  return static_cast<State&>(*found->second);
}

optim::AdamWParams adamw_params(const torch::optim::AdamWOptions& options) {
  FERRY_CHECK(!options.amsgrad(), "CpuAdamW: amsgrad = true is not supported; use amsgrad = false");
  optim::AdamWParams params;
  params.lr = options.lr();
  params.beta1 = std::get<0>(options.betas());
  params.beta2 = std::get<1>(options.betas());
  params.eps = options.eps();
  params.weight_decay = options.weight_decay();
  optim::check_params(params);
  return params;
}

optim::AdamParams adam_params(const torch::optim::AdamOptions& options) {
  FERRY_CHECK(!options.amsgrad(), "CpuAdam: amsgrad = true is not supported; use amsgrad = false");
  optim::AdamParams params;
  params.lr = options.lr();
  params.beta1 = std::get<0>(options.betas());
  params.beta2 = std::get<1>(options.betas());
  params.eps = options.eps();
  params.weight_decay = options.weight_decay();
  optim::check_params(params);
  return params;
}

optim::SgdParams sgd_params(const torch::optim::SGDOptions& options) {
  optim::SgdParams params;
  params.lr = options.lr();
  params.momentum = options.momentum();
  params.dampening = options.dampening();
  params.weight_decay = options.weight_decay();
  params.nesterov = options.nesterov();
  optim::check_params(params);
  return params;
}

optim::AdagradParams adagrad_params(const torch::optim::AdagradOptions& options) {
  FERRY_CHECK(options.initial_accumulator_value() >= 0,
              "CpuAdagrad: initial_accumulator_value = ", options.initial_accumulator_value(),
              " is invalid; it must be >= 0");
  optim::AdagradParams params;
  params.lr = options.lr();
  params.lr_decay = options.lr_decay();
  params.weight_decay = options.weight_decay();
  params.eps = options.eps();
  optim::check_params(params);
  return params;
}

std::unique_ptr<torch::optim::AdagradParamState> fresh_adagrad_state(
    const torch::Tensor& param, const torch::optim::AdagradOptions& options) {
  auto state = std::make_unique<torch::optim::AdagradParamState>();
  state->sum(torch::full_like(param, options.initial_accumulator_value()));
  return state;
}

// Checks every group's options (through to_params) and parameters, so that a bad setting
// fails when the optimizer is built rather than at its first step.
template <class Options, class ToParams>
void check_groups(const char* who, const std::vector<OptimizerParamGroup>& groups,
                  const ToParams& to_params) {
  for (const OptimizerParamGroup& group : groups) {
    to_params(static_cast<const Options&>(group.options()));
    for (const torch::Tensor& param : group.params()) {
      float_span(who, "parameter", param);
    }
  }
}

// Adam and AdamW keep the same per-parameter state and differ only in the update rule.
template <typename ParamState, typename States, typename Params, typename Rule>
optim::StepReport adam_family_update(const char* who, States& states, const torch::Tensor& param,
                                     const torch::Tensor& grad, const Params& params, Rule rule) {
  auto& state = state_for<ParamState>(states, param, [&] {
    auto fresh = std::make_unique<ParamState>();
    fresh->exp_avg(torch::zeros_like(param));
    fresh->exp_avg_sq(torch::zeros_like(param));
    return fresh;
  });
  optim::StepContext context;
  context.step = state.step() + 1;
  const optim::StepReport report =
      rule(params, context, float_span(who, "parameter", param),
           float_span(who, "exp_avg", state.exp_avg()),
           float_span(who, "exp_avg_sq", state.exp_avg_sq()), grad_span(who, grad, param),
           optim::OutputSpan{});
  if (!report.skipped) state.step(context.step);
  return report;
}

}  // namespace

torch::Tensor CpuOptimizer::step(LossClosure closure) {
  torch::Tensor loss;
  if (closure != nullptr) {
    torch::AutoGradMode enable_grad(true);
    loss = closure();
  }
  torch::NoGradGuard no_grad;
  skipped_in_last_step_ = 0;
  for (OptimizerParamGroup& group : param_groups_) {
    for (const torch::Tensor& param : group.params()) {
      const torch::Tensor& grad = param.grad();
      if (!grad.defined()) continue;
      if (update(group.options(), param, grad).skipped) ++skipped_in_last_step_;
    }
  }
  return loss;
}

// AdamW ------------------------------------------------------------------------------------


CpuAdamW::CpuAdamW(std::vector<OptimizerParamGroup> param_groups,
                   torch::optim::AdamWOptions defaults)
    : CpuOptimizer(std::move(param_groups),
                   std::make_unique<torch::optim::AdamWOptions>(defaults)) {
  check_groups<torch::optim::AdamWOptions>("CpuAdamW", param_groups_, adamw_params);
}

CpuAdamW::CpuAdamW(std::vector<torch::Tensor> params, torch::optim::AdamWOptions defaults)
    : CpuAdamW(std::vector<OptimizerParamGroup>{OptimizerParamGroup(std::move(params))},
               defaults) {}

optim::StepReport CpuAdamW::update(OptimizerOptions& options, const torch::Tensor& param,
                                   const torch::Tensor& grad) {
  return adam_family_update<torch::optim::AdamWParamState>(
      "CpuAdamW", state_, param, grad,
      adamw_params(static_cast<const torch::optim::AdamWOptions&>(options)),
      [](auto&&... args) { return optim::adamw_step(args...); });
}

void CpuAdamW::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<torch::optim::AdamWParamState, torch::optim::AdamWOptions>(archive,
                                                                                     *this);
}

void CpuAdamW::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<torch::optim::AdamWParamState, torch::optim::AdamWOptions>(archive,
                                                                                     *this);
}

// Adam -------------------------------------------------------------------------------------

CpuAdam::CpuAdam(std::vector<OptimizerParamGroup> param_groups,
                 torch::optim::AdamOptions defaults)
    : CpuOptimizer(std::move(param_groups),
                   std::make_unique<torch::optim::AdamOptions>(defaults)) {
  check_groups<torch::optim::AdamOptions>("CpuAdam", param_groups_, adam_params);
}

CpuAdam::CpuAdam(std::vector<torch::Tensor> params, torch::optim::AdamOptions defaults)
    : CpuAdam(std::vector<OptimizerParamGroup>{OptimizerParamGroup(std::move(params))},
              defaults) {}

optim::StepReport CpuAdam::update(OptimizerOptions& options, const torch::Tensor& param,
                                  const torch::Tensor& grad) {
  return adam_family_update<torch::optim::AdamParamState>(
      "CpuAdam", state_, param, grad,
      adam_params(static_cast<const torch::optim::AdamOptions&>(options)),
      [](auto&&... args) { return optim::adam_step(args...); });
}

void CpuAdam::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<torch::optim::AdamParamState, torch::optim::AdamOptions>(archive,
                                                                                   *this);
}

void CpuAdam::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<torch::optim::AdamParamState, torch::optim::AdamOptions>(archive,
                                                                                   *this);
}

// SGD --------------------------------------------------------------------------------------

CpuSGD::CpuSGD(std::vector<OptimizerParamGroup> param_groups, torch::optim::SGDOptions defaults)
    : CpuOptimizer(std::move(param_groups),
                   std::make_unique<torch::optim::SGDOptions>(defaults)) {
  check_groups<torch::optim::SGDOptions>("CpuSGD", param_groups_, sgd_params);
}

CpuSGD::CpuSGD(std::vector<torch::Tensor> params, torch::optim::SGDOptions defaults)
    : CpuSGD(std::vector<OptimizerParamGroup>{OptimizerParamGroup(std::move(params))},
             defaults) {}

optim::StepReport CpuSGD::update(OptimizerOptions& options, const torch::Tensor& param,
                                 const torch::Tensor& grad) {
  constexpr const char* kWho = "CpuSGD";
  const optim::SgdParams params =
      sgd_params(static_cast<const torch::optim::SGDOptions&>(options));
  const optim::FloatSpan master = float_span(kWho, "parameter", param);
  const optim::GradSpan grad_values = grad_span(kWho, grad, param);
  if (params.momentum == 0) {
    return optim::sgd_step(params, optim::StepContext{}, master, {}, grad_values);
  }
  // Like torch, the first step (no buffer yet) sets the momentum buffer to the gradient.
  auto key = state_key(state_, param);
  const bool first_step = state_.find(key) == state_.end();
  auto& state = state_for<torch::optim::SGDParamState>(state_, param, [&] {
    auto fresh = std::make_unique<torch::optim::SGDParamState>();
    fresh->momentum_buffer(torch::empty_like(param));
    return fresh;
  });
  optim::StepContext context;
  context.step = first_step ? 1 : 2;
  const optim::StepReport report =
      optim::sgd_step(params, context, master,
                      float_span(kWho, "momentum_buffer", state.momentum_buffer()), grad_values);
  if (report.skipped && first_step) state_.erase(key);
  return report;
}

void CpuSGD::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<torch::optim::SGDParamState, torch::optim::SGDOptions>(archive, *this);
}

void CpuSGD::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<torch::optim::SGDParamState, torch::optim::SGDOptions>(archive, *this);
}

// Adagrad ----------------------------------------------------------------------------------

CpuAdagrad::CpuAdagrad(std::vector<OptimizerParamGroup> param_groups,
                       torch::optim::AdagradOptions defaults)
    : CpuOptimizer(std::move(param_groups),
                   std::make_unique<torch::optim::AdagradOptions>(defaults)) {
  check_groups<torch::optim::AdagradOptions>("CpuAdagrad", param_groups_, adagrad_params);
  // Like torch, the state exists from the start, so that it is saved even before a step.
  for (OptimizerParamGroup& group : param_groups_) {
    const auto& options = static_cast<const torch::optim::AdagradOptions&>(group.options());
    for (const torch::Tensor& param : group.params()) {
      state_for<torch::optim::AdagradParamState>(
          state_, param, [&] { return fresh_adagrad_state(param, options); });
    }
  }
}

CpuAdagrad::CpuAdagrad(std::vector<torch::Tensor> params, torch::optim::AdagradOptions defaults)
    : CpuAdagrad(std::vector<OptimizerParamGroup>{OptimizerParamGroup(std::move(params))},
                 defaults) {}

optim::StepReport CpuAdagrad::update(OptimizerOptions& options, const torch::Tensor& param,
                                     const torch::Tensor& grad) {
  constexpr const char* kWho = "CpuAdagrad";
  const auto& adagrad_options = static_cast<const torch::optim::AdagradOptions&>(options);
  const optim::AdagradParams params = adagrad_params(adagrad_options);
  auto& state = state_for<torch::optim::AdagradParamState>(
      state_, param, [&] { return fresh_adagrad_state(param, adagrad_options); });
  optim::StepContext context;
  context.step = state.step() + 1;
  const optim::StepReport report =
      optim::adagrad_step(params, context, float_span(kWho, "parameter", param),
                          float_span(kWho, "sum", state.sum()), grad_span(kWho, grad, param));
  if (!report.skipped) state.step(context.step);
  return report;
}

void CpuAdagrad::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<torch::optim::AdagradParamState, torch::optim::AdagradOptions>(
      archive, *this);
}

void CpuAdagrad::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<torch::optim::AdagradParamState, torch::optim::AdagradOptions>(
      archive, *this);
}

}  // namespace ferry
