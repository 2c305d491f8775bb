#include "cli/plain_loop.h"

#include <torch/version.h>

#include "ferry/check.h"

namespace ferry::cli {

// torch's fused AdamW kernel, in LibTorch from 2.4 on.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
#define FERRY_HAVE_FUSED_ADAMW 1
#else
#define FERRY_HAVE_FUSED_ADAMW 0
#endif

PlainLoop::PlainLoop(const models::ModelConfig& config, std::uint64_t seed, torch::Device device,
                     torch::ScalarType dtype, const OptimizerConfig& optimizer)
    : model_(models::build(config, seed)), device_(device), optimizer_(optimizer) {
  FERRY_CHECK(optimizer.kind == OptimizerKind::kAdamW, "the plain loop runs AdamW; the optimizer is ",
              to_string(optimizer.kind));
  model_.to(device, dtype);
  for (const torch::Tensor& parameter : model_.parameters()) {
    if (parameter.requires_grad()) trained_.push_back(parameter);
  }
  FERRY_CHECK(!trained_.empty(), "the plain loop's model has no trainable parameter");
  fused_ = FERRY_HAVE_FUSED_ADAMW && device.is_cuda();
  if (!fused_) {
    adamw_ = std::make_unique<torch::optim::AdamW>(trained_, torch::optim::AdamWOptions(optimizer.lr)
                                                                 .betas({optimizer.beta1, optimizer.beta2})
                                                                 .eps(optimizer.eps)
                                                                 .weight_decay(optimizer.weight_decay));
    return;
  }
  for (const torch::Tensor& p : trained_) {
    exp_avg_.push_back(torch::zeros_like(p));
    exp_avg_sq_.push_back(torch::zeros_like(p));
    state_steps_.push_back(torch::zeros({}, p.options().dtype(torch::kFloat)));
  }
}

torch::Tensor PlainLoop::step(const data::Batch& batch) {
  torch::Tensor loss = model_.loss(model_.forward(batch.input_ids.to(device_)), batch.labels.to(device_));
  loss.backward();
  optimizer_step();
  for (torch::Tensor& p : trained_) p.mutable_grad() = torch::Tensor();
  return loss.detach();
}

void PlainLoop::optimizer_step() {
  if (!fused_) {
    adamw_->step();
    return;
  }
#if FERRY_HAVE_FUSED_ADAMW
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> grads;
  for (const torch::Tensor& p : trained_) grads.push_back(p.grad());
  for (torch::Tensor& s : state_steps_) s.add_(1);
  at::_fused_adamw_(trained_, grads, exp_avg_, exp_avg_sq_, {}, state_steps_, optimizer_.lr, optimizer_.beta1,
                    optimizer_.beta2, optimizer_.weight_decay, optimizer_.eps, false, false);
#endif
}

}  // namespace ferry::cli
