#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "engine/parts.h"
#include "engine/trace.h"
#include "engine/update.h"
#include "ferry/engine.h"
#include "ferry/system.h"

namespace ferry::detail {

// Runs tasks one after another on its own thread, in submission order: the CPU side of the
// offload pipeline (gradient accumulation, norms, optimizer updates) in backward order.
class SerialWorker {
 public:
  SerialWorker();
  ~SerialWorker();
  std::shared_future<void> submit(std::function<void()> task);

 private:
  void run();

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::packaged_task<void()>> tasks_;
  bool stopping_ = false;
  std::thread thread_;
};

// What forward keeps for backward.
struct PendingBackward {
  StepContext context;
  torch::Tensor tokens;
  torch::Tensor stem_output;
  struct SavedBlock {
    torch::Tensor input;   // the block's input: a checkpoint, or the leaf of its kept graph
    torch::Tensor output;  // defined when the graph was kept
  };
  std::vector<SavedBlock> blocks;
  torch::Tensor head_input;
  torch::Tensor loss;
  std::int64_t token_count = 0;  // input tokens, padding included
};

}  // namespace ferry::detail

namespace ferry {

struct Engine::Impl {
  Impl(LayeredModel model, EngineConfig config);
  ~Impl();

  // Setup.
  void allocate_and_bind();
  TierDemand demand() const;

  // The step.
  torch::Tensor forward(const data::Batch& batch);
  void backward(const torch::Tensor& loss);
  StepResult step();
  torch::Tensor run_inference(const torch::Tensor& tokens, const torch::Tensor& padding_mask);

  // Per part.
  void use_parameters(std::size_t part);
  void bind_gradients(const detail::Part& part);
  void unbind_gradients(const detail::Part& part);
  void prepare_gradients(std::size_t part);
  // Evicts device gradients that have gone down, waiting for the oldest while more than `keep`
  // are still on the device.
  void release_gradients(std::size_t keep);
  void gradients_ready(std::size_t part);
  void accumulate_and_measure(std::size_t part, bool last_micro_batch);
  bool update(std::size_t part, const detail::UpdateContext& context);
  void wait_for_workers();
  void read_device_stats();

  torch::Tensor view(BundleId id, Tier tier, torch::ScalarType dtype, std::int64_t numel) const;
  torch::Tensor master_view(const detail::Part& part) const;
  torch::Tensor gradient_view(const detail::Part& part) const;
  bool deferred_updates() const;
  bool offloaded() const { return config.mode == Mode::kZeroOffload; }

  LayeredModel model;
  EngineConfig config;
  torch::ScalarType compute_dtype;
  Tier optimizer_tier;
  std::unique_ptr<Store> store;
  std::vector<detail::Part> parts;
  detail::LossScaler scaler;

  std::int64_t steps = 0;          // optimizer steps taken
  std::int64_t micro_batches = 0;  // in the current step
  torch::Tensor step_loss_sum;  // fp64 on the device, over the step's micro-batches
  std::int64_t step_tokens = 0;
  double step_lr = 0;
  std::optional<detail::PendingBackward> pending;

  std::vector<optim::GradStats> part_stats;
  std::vector<torch::Tensor> device_stats;  // [sum of squares, non-finite count] still on a device
  std::vector<bool> part_updated;
  std::vector<Fence> uploads;         // parameters going up to the device
  std::vector<Fence> gradients_down;  // gradients going down to the host
  std::deque<std::size_t> gradients_on_device;  // parts whose device gradients are not evicted yet
  std::vector<std::shared_future<void>> part_work;
  detail::SerialWorker worker;

  // Runs f, and records it as a span on `track` when tracing.
  template <typename F>
  void traced(const std::string& name, detail::Track track, F f) {
    if (!tracer.enabled()) return f();
    auto start = detail::Tracer::Clock::now();
    f();
    if (track == detail::Track::kCompute && config.device.is_cuda()) synchronize_gpu();
    tracer.record(name, track, start, detail::Tracer::Clock::now());
  }

  detail::Tracer tracer;
  EngineStats stats;
  std::mutex stats_mutex;  // optimizer_seconds is written by the worker
};

}  // namespace ferry
