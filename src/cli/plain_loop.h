#pragma once

// The plain LibTorch loop `ferry bench finetune` measures ferry against: the same model (ferry's
// own modules, built from the same config and seed) whole on one device in one dtype, one
// autograd graph over it, and AdamW over the trainable parameters alone. With LoRA
// (ModelConfig::lora) those are the adapters A and B; the base weights are frozen (requires_grad
// = False), so autograd computes no gradient for them. No bundles, no engine, no fp32 master.

#include <cstdint>
#include <memory>
#include <vector>

#include <torch/torch.h>

#include "ferry/data.h"
#include "ferry/engine.h"
#include "ferry/model.h"

namespace ferry::cli {

class PlainLoop {
 public:
  // AdamW with `optimizer`'s lr, betas, eps and weight decay (on every trained parameter: with
  // LoRA all of them matrices, which ferry decays too). On CUDA with LibTorch >= 2.4 it is torch's
  // fused kernel (at::_fused_adamw_), otherwise torch::optim::AdamW.
  PlainLoop(const models::ModelConfig& config, std::uint64_t seed, torch::Device device, torch::ScalarType dtype,
            const OptimizerConfig& optimizer);

  // Forward, loss, backward and the AdamW step over `batch`; the loss, on the device, without
  // waiting for it.
  torch::Tensor step(const data::Batch& batch);

  const std::vector<torch::Tensor>& trained() const { return trained_; }
  const char* optimizer_name() const { return fused_ ? "at::_fused_adamw_" : "torch::optim::AdamW"; }

 private:
  void optimizer_step();

  LayeredModel model_;
  torch::Device device_;
  OptimizerConfig optimizer_;
  std::vector<torch::Tensor> trained_;  // requires_grad, in the model's order
  bool fused_ = false;
  // The fused kernel's state.
  std::vector<torch::Tensor> exp_avg_, exp_avg_sq_, state_steps_;
  std::unique_ptr<torch::optim::AdamW> adamw_;  // when not fused
};

}  // namespace ferry::cli
