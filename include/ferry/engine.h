#pragma once

// The execution engine (DESIGN.md, layer 6): drives a LayeredModel block by block, with the
// parameters, gradients and optimizer states of each part (stem, every block, head) in bundles
// of the residency manager. The offload mode decides on which tier the optimizer runs and what
// moves between tiers; the step itself is one code path for every mode. See docs/engine.md.
//
//   ferry::Engine engine(std::move(model), config);
//   for (...) {
//     torch::Tensor loss = engine.forward(batch);
//     engine.backward(loss);
//     engine.step();           // or: engine.train_step(batch)
//   }

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/types.h>

#include "ferry/data.h"
#include "ferry/model.h"
#include "ferry/store.h"

namespace ferry {

enum class Mode { kGpu, kZeroOffload };
const char* to_string(Mode mode);
Mode parse_mode(const std::string& name);  // "gpu", "zero-offload"

enum class Precision { kF32, kBF16, kF16 };
const char* to_string(Precision precision);
Precision parse_precision(const std::string& name);  // "fp32", "bf16", "fp16"

enum class OptimizerKind { kAdamW, kAdam, kSgd, kAdagrad };
const char* to_string(OptimizerKind kind);
OptimizerKind parse_optimizer(const std::string& name);  // "adamw", "adam", "sgd", "adagrad"

struct OptimizerConfig {
  OptimizerKind kind = OptimizerKind::kAdamW;
  double lr = 1e-3;
  double beta1 = 0.9;          // adamw, adam
  double beta2 = 0.999;        // adamw, adam
  double eps = 1e-8;           // adamw, adam, adagrad
  double weight_decay = 0.0;   // not applied to norms and biases (is_no_decay)
  double momentum = 0.0;       // sgd
  bool nesterov = false;       // sgd
};

enum class LrSchedule { kConstant, kLinear, kCosine };
const char* to_string(LrSchedule schedule);
LrSchedule parse_schedule(const std::string& name);  // "constant", "linear", "cosine"

struct ScheduleConfig {
  LrSchedule kind = LrSchedule::kConstant;
  std::int64_t warmup_steps = 0;  // linear from 0 to lr over these steps
  std::int64_t total_steps = 0;   // linear and cosine decay end here; required for them
  double min_lr_ratio = 0.0;      // the floor of the decay, as a fraction of lr
};

// Dynamic loss scaling, as torch.cuda.amp.GradScaler: on by default for fp16.
struct LossScaleConfig {
  std::optional<bool> enabled;   // default: precision == fp16
  double initial_scale = 65536.0;
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  std::int64_t growth_interval = 2000;
};

struct EngineConfig {
  Mode mode = Mode::kZeroOffload;
  Precision precision = Precision::kF32;
  torch::Device device = torch::kCPU;  // the GPU tier; kCPU runs everything on the host
  std::uint64_t gpu_budget_bytes = 0;   // 0: everything the mode needs on the device
  std::uint64_t host_budget_bytes = 0;  // 0: everything the mode needs on the host
  OptimizerConfig optimizer;
  ScheduleConfig schedule;
  LossScaleConfig loss_scale;
  std::int64_t grad_accumulation = 1;  // micro-batches per optimizer step
  double max_grad_norm = 0.0;          // global-norm clipping; 0 turns it off
  // Activation checkpointing at block boundaries: the last `keep_graph_blocks` blocks keep their
  // autograd graph from the forward; the others keep only their input and are recomputed in
  // backward. `offload_checkpoints` keeps those inputs in host memory instead of on the device.
  std::int64_t keep_graph_blocks = 0;
  bool offload_checkpoints = false;
  // Threads for the CPU optimizer (0: one per core).
  int optimizer_threads = 0;
  // Record spans for write_trace(). On a CUDA device the engine then waits for the device at
  // every part boundary, so compute spans are real at the cost of some overlap.
  bool trace = false;
};

// What one optimizer step did.
struct StepResult {
  std::int64_t step = 0;      // optimizer steps taken so far, skipped ones included
  double loss = 0;            // mean loss of the step's micro-batches
  double lr = 0;
  double grad_norm = 0;       // before clipping; NaN when the gradients were not finite
  double loss_scale = 1;
  bool skipped = false;       // non-finite gradients (fp16 overflow): nothing was updated
  std::int64_t tokens = 0;    // input tokens over the step's micro-batches
};

// Seconds per phase, accumulated since construction; the residency manager's own statistics
// come with it.
struct EngineStats {
  std::int64_t steps = 0;
  double forward_seconds = 0;
  double backward_seconds = 0;
  double optimizer_seconds = 0;        // CPU or device time inside optimizer updates
  double optimizer_wait_seconds = 0;   // time the step waited for updates still running
  StoreStats store;
};

class Engine {
 public:
  // Takes the model, moves its parameters into bundles on the tiers the mode chooses and binds
  // the modules to views of them. Throws BudgetExceeded, naming the tier and the shortfall, when
  // the budgets cannot hold what the mode needs; nothing is allocated past a budget.
  Engine(LayeredModel model, EngineConfig config);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // One micro-batch: returns its loss (a scalar); backward() must follow before the next forward.
  torch::Tensor forward(const data::Batch& batch);
  void backward(const torch::Tensor& loss);
  // Applies the accumulated gradients. Call once every grad_accumulation micro-batches.
  StepResult step();
  // forward, backward and, every grad_accumulation micro-batches, step. Returns the step's result
  // when one was taken.
  std::optional<StepResult> train_step(const data::Batch& batch);

  // Loss without gradients, and logits for generation. Neither changes the training state.
  double evaluate(const data::Batch& batch);
  torch::Tensor logits(const torch::Tensor& tokens);
  // Greedy decoding of up to max_new_tokens after prompt, stopping at stop_token when given.
  std::vector<std::int64_t> generate(const std::vector<std::int64_t>& prompt,
                                     std::int64_t max_new_tokens,
                                     std::optional<std::int64_t> stop_token = std::nullopt);

  // Checkpoints: a directory with the weights as safetensors under Hugging Face names
  // (fp32 master weights), the optimizer state, and trainer_state.json (step, schedule, loss
  // scale, and `extra`, e.g. the data loader's position). Written atomically: into a temporary
  // directory, fsynced, then renamed over `dir`.
  void save(const std::string& dir, const std::string& extra_json = "{}");
  // Restores what save wrote; returns `extra`. The model must have the same shape.
  std::string load(const std::string& dir);

  // Writes the spans recorded so far (config.trace) as a Chrome trace and returns a one-line
  // summary of how much of the CPU optimizer's time overlapped compute.
  std::string write_trace(const std::string& path) const;

  const LayeredModel& model() const;
  const EngineConfig& config() const;
  std::int64_t steps_taken() const;
  double current_lr() const;
  EngineStats stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ferry
