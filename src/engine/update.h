#pragma once

// The optimizer side of a step, for one part at a time, on whichever tier holds the part's
// optimizer state: ferry's CPU kernels where the tensors are in host memory, the same update
// in torch ops where they are on a CUDA device. Plus what a step needs around it: the learning
// rate schedule and the dynamic loss scaler.

#include <cstdint>
#include <vector>

#include <torch/types.h>

#include "ferry/engine.h"
#include "ferry/optim.h"

namespace ferry::detail {

// The learning rate of optimizer step `step` (1 for the first).
double scheduled_lr(const ScheduleConfig& schedule, double base_lr, std::int64_t step);

// Number of fp32 state tensors the optimizer keeps per parameter.
int optimizer_state_count(const OptimizerConfig& config);

// Throws ferry::Error naming the bad setting.
void validate(const OptimizerConfig& config);

// One part's flat tensors on the optimizer's tier. Parameters in [0, decay_numel) take weight
// decay; the rest (norms and biases) do not.
struct PartUpdate {
  torch::Tensor master;               // fp32
  std::vector<torch::Tensor> states;  // fp32, optimizer_state_count() of them
  torch::Tensor grad;                 // fp32, bf16 or fp16: still multiplied by the loss scale
  torch::Tensor output;               // bf16/fp16 copy of the updated master; undefined: none
  std::int64_t decay_numel = 0;
};

struct UpdateContext {
  std::int64_t step = 1;
  double lr = 0;
  double grad_scale = 1;
  double clip_coef = 1;
  bool grad_checked_finite = false;
};

// Returns whether the update was skipped for a non-finite gradient.
bool apply_update(const OptimizerConfig& config, const UpdateContext& context, PartUpdate& part);

// Sum of squares (in fp64) and finiteness of a raw gradient.
optim::GradStats gradient_stats(const torch::Tensor& grad);
// The same for a gradient on a CUDA device, without waiting for it: the kernel and a copy of its
// result into pinned host memory are queued on the current stream, and the returned host tensor
// holds the result once the stream has passed this point (a later copy off the device that waits
// for the stream, or wait_for_current_stream). measured_stats reads it.
torch::Tensor measure_on_device(const torch::Tensor& grad);
optim::GradStats measured_stats(const torch::Tensor& measured);
void wait_for_current_stream(torch::Device device);

// Dynamic loss scaling as torch.cuda.amp.GradScaler does it.
class LossScaler {
 public:
  explicit LossScaler(const LossScaleConfig& config, bool enabled);
  bool enabled() const { return enabled_; }
  double scale() const { return enabled_ ? scale_ : 1.0; }
  // After a step: backs off on overflow, grows after growth_interval clean steps.
  void update(bool overflow);

  double raw_scale() const { return scale_; }
  std::int64_t clean_steps() const { return clean_steps_; }
  void restore(double scale, std::int64_t clean_steps);

 private:
  LossScaleConfig config_;
  bool enabled_;
  double scale_;
  std::int64_t clean_steps_ = 0;
};

}  // namespace ferry::detail
