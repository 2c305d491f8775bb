#pragma once

// ferry's CPU optimizers as torch::optim::Optimizer subclasses, so an existing LibTorch C++
// loop can swap torch::optim::AdamW for ferry::CpuAdamW. They take torch's own option types
// and keep torch's per-parameter state (exp_avg, exp_avg_sq, step; momentum_buffer; sum, step),
// so state saved by torch's optimizer loads into ferry's and the other way round.
//
// Parameters must be contiguous fp32 CPU tensors; gradients contiguous CPU fp32, bf16 or fp16.
// A parameter whose gradient holds an Inf or NaN is skipped (it and its state stay unchanged,
// its step count does not advance) and counted in skipped_in_last_step().

#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/optimizer.h>
#include <torch/optim/sgd.h>

#include <cstdint>
#include <vector>

#include "ferry/optim.h"

namespace ferry {

// What the four optimizers share: step() visits every parameter that has a gradient.
class CpuOptimizer : public torch::optim::Optimizer {
 public:
  torch::Tensor step(LossClosure closure = nullptr) override;

  // Parameters left unchanged by the last step() because their gradient was not finite.
  std::int64_t skipped_in_last_step() const { return skipped_in_last_step_; }

 protected:
  using torch::optim::Optimizer::Optimizer;

  virtual optim::StepReport update(torch::optim::OptimizerOptions& options,
                                   const torch::Tensor& param, const torch::Tensor& grad) = 0;

 private:
  std::int64_t skipped_in_last_step_ = 0;
};

class CpuAdamW final : public CpuOptimizer {
 public:
  explicit CpuAdamW(std::vector<torch::optim::OptimizerParamGroup> param_groups,
                    torch::optim::AdamWOptions defaults = {});
  explicit CpuAdamW(std::vector<torch::Tensor> params, torch::optim::AdamWOptions defaults = {});

  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 private:
  optim::StepReport update(torch::optim::OptimizerOptions& options, const torch::Tensor& param,
                           const torch::Tensor& grad) override;
};

class CpuAdam final : public CpuOptimizer {
 public:
  explicit CpuAdam(std::vector<torch::optim::OptimizerParamGroup> param_groups,
                   torch::optim::AdamOptions defaults = {});
  explicit CpuAdam(std::vector<torch::Tensor> params, torch::optim::AdamOptions defaults = {});

  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 private:
  optim::StepReport update(torch::optim::OptimizerOptions& options, const torch::Tensor& param,
                           const torch::Tensor& grad) override;
};

class CpuSGD final : public CpuOptimizer {
 public:
  CpuSGD(std::vector<torch::optim::OptimizerParamGroup> param_groups,
         torch::optim::SGDOptions defaults);
  CpuSGD(std::vector<torch::Tensor> params, torch::optim::SGDOptions defaults);

  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 private:
  optim::StepReport update(torch::optim::OptimizerOptions& options, const torch::Tensor& param,
                           const torch::Tensor& grad) override;
};

class CpuAdagrad final : public CpuOptimizer {
 public:
  explicit CpuAdagrad(std::vector<torch::optim::OptimizerParamGroup> param_groups,
                      torch::optim::AdagradOptions defaults = {});
  explicit CpuAdagrad(std::vector<torch::Tensor> params,
                      torch::optim::AdagradOptions defaults = {});

  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 private:
  optim::StepReport update(torch::optim::OptimizerOptions& options, const torch::Tensor& param,
                           const torch::Tensor& grad) override;
};

}  // namespace ferry
