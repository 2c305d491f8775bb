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
#include "engine/sizing.h"
#include "engine/trace.h"
#include "engine/update.h"
#include "engine/window.h"
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
  torch::Tensor labels;
  torch::Tensor stem_output;
  struct SavedBlock {
    torch::Tensor input;   // the leaf of its kept graph
    torch::Tensor output;  // defined when the graph was kept
    BundleId checkpoint = UINT32_MAX;  // otherwise the block's input is here, on its home tier
  };
  std::vector<std::int64_t> hidden_shape;
  std::vector<SavedBlock> blocks;
  torch::Tensor head_input;
  torch::Tensor loss;
  torch::Tensor gradient;  // in backward: the gradient flowing into the part about to run
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

  // The step: forward, backward and step for one micro-batch at a time (batch-major), or
  // train_step, which runs a whole step in layer-major order once its micro-batches are in.
  torch::Tensor forward(const data::Batch& batch);
  void backward(const torch::Tensor& loss);
  StepResult step();
  std::optional<StepResult> train_step(const data::Batch& batch);
  StepResult train_layer_major(const std::vector<data::Batch>& batches);
  void check_batch_major(const char* call) const;

  // The passes, over one micro-batch (batch-major) or all of a step's (layer-major).
  void start_step();
  detail::PendingBackward prepare_micro_batch(const data::Batch& batch, std::int64_t micro_batch) const;
  void forward_blocks(std::vector<detail::PendingBackward>& micro);
  void forward_head(detail::PendingBackward& saved);
  bool updates_now() const;  // the backward that starts now ends with the updates
  void begin_backward();
  void backward_head(detail::PendingBackward& saved);
  // `summed`: each micro-batch's gradients are folded into the part's fp32 sum on the device.
  void backward_blocks(std::vector<detail::PendingBackward>& micro, bool summed);
  void backward_stem(std::vector<detail::PendingBackward>& micro, bool summed);
  void fold_gradients(std::size_t part, bool first);
  torch::Tensor run_inference(const torch::Tensor& tokens, const torch::Tensor& padding_mask,
                              const torch::Tensor& position_ids = {});

  // Parameters on the device. Streamed blocks (fuyou) visit it through `window`, the others wait
  // for their last upload.
  bool streamed(std::size_t part) const { return homes[part].params != Tier::kGpu; }
  std::vector<std::vector<BundleId>> parameter_visits(bool reverse) const;
  void enter_part(std::size_t part);  // the part's parameters are usable by work queued next
  void enter_block(std::size_t block, std::size_t visit);

  // Activation checkpoints, as bundles on their block's tier: host and NVMe ones go down in
  // forward and come back in backward.
  void size_checkpoints(std::uint64_t bytes);  // every micro-batch's checkpoint fits
  BundleId checkpoint_bundle(std::size_t block, std::size_t micro_batch);
  void save_checkpoint(std::size_t block, std::size_t micro_batch, const torch::Tensor& hidden,
                       detail::PendingBackward::SavedBlock& saved);
  void release_checkpoints(std::size_t keep);

  // Gradients, per part.
  void collect_gradients(std::size_t part);
  void prepare_gradients(std::size_t part);
  // Evicts device gradients that have gone down, waiting for the oldest while more than `keep`
  // are still on the device.
  void release_gradients(std::size_t keep);
  void gradients_ready(std::size_t part, bool summed);
  void accumulate_and_measure(std::size_t part, bool first_micro_batch, bool last_micro_batch,
                              bool summed_on_device);
  // Where gradients wait on the host for the CPU optimizer, backward lets at most
  // kGradientsAhead parts' wait there beyond the one being updated.
  void limit_gradients_ahead();

  // The CPU optimizer's side. A bundle whose home is not the optimizer's tier is staged there:
  // fetched (or only allocated when it is about to be overwritten), changed, committed home and
  // released again.
  Fence stage(BundleId id, bool overwrite);
  Fence commit(std::size_t part, BundleId id);
  void release_staged(BundleId id);
  bool staged_on_host(BundleId id) const;
  void prefetch_optimizer_state(std::size_t part);
  // Evicts staged copies whose commits are done; waits for those of parts after `keep_part`
  // (updated earlier: backward runs from the last part to the first).
  void release_going_home(std::size_t keep_part);
  void drain_going_home();  // waits for every commit and evicts the staged copies
  // `upload`: the new parameters go up to the device now; otherwise they wait on the host for
  // upload_parameters (a delayed update).
  bool update(std::size_t part, const detail::UpdateContext& context, bool upload);
  void wait_for_workers();
  void wait_for_part(std::size_t part);  // the worker is done with the part's earlier tasks
  void read_device_stats();

  // Whole-bundle reads and writes for checkpoints, through host staging where needed.
  torch::Tensor read_bundle(BundleId id, torch::ScalarType dtype, std::int64_t numel);
  void write_bundle(std::size_t part, BundleId id, const torch::Tensor& values);

  torch::Tensor view(BundleId id, Tier tier, torch::ScalarType dtype, std::int64_t numel) const;
  BundleId master_bundle(const detail::Part& part) const;
  torch::Tensor master_view(const detail::Part& part) const;
  // What the optimizer reads: the fp32 accumulator when there is one, else the raw gradients.
  BundleId gradient_bundle(const detail::Part& part) const;
  torch::Tensor gradient_view(const detail::Part& part) const;
  bool deferred_updates() const;
  // One-step delayed parameter update (DelayedUpdateConfig): whether the step now running leaves
  // its update to run during the next one.
  bool delays_update() const;
  void upload_parameters(std::size_t part);
  void flush();
  bool offloaded() const { return config.mode != Mode::kGpu; }

  LayeredModel model;
  EngineConfig config;
  torch::ScalarType compute_dtype;
  Tier optimizer_tier;  // where updates compute
  std::unique_ptr<Store> store;
  std::optional<NvmeLayout> staged;  // during set-up only: the staged layout being adopted
  std::vector<detail::Part> parts;
  std::vector<detail::PartHomes> homes;
  std::vector<BlockActivations> activations;
  std::unique_ptr<detail::DeviceWindow> window;
  detail::LossScaler scaler;

  std::int64_t steps = 0;          // optimizer steps taken
  std::int64_t micro_batches = 0;  // in the current step
  torch::Tensor step_loss_sum;  // fp64 on the device, over the step's micro-batches
  std::int64_t step_tokens = 0;
  double step_lr = 0;
  std::optional<detail::PendingBackward> pending;
  std::vector<data::Batch> buffered;  // layer-major: the step's micro-batches so far

  // Activation checkpoints, per block and micro-batch, as bundles under the budget of their tier.
  std::vector<BundleId> checkpoints;
  std::uint64_t checkpoint_bytes = 0;
  std::deque<std::pair<BundleId, Fence>> checkpoints_down;

  std::vector<optim::GradStats> part_stats;
  std::vector<torch::Tensor> device_stats;  // measure_on_device results not read yet
  std::vector<bool> part_updated;
  std::vector<Fence> uploads;         // parameters going up to the device
  // Parts whose device parameters lack their last (delayed) update: its result waits in the host
  // copy until the part's backward in the next step is done.
  std::vector<bool> stale_on_device;
  std::vector<Fence> gradients_down;  // gradients going down to the host
  // Parts whose device gradients (or their sum) are not dropped yet, with the bundle sent down.
  std::deque<std::pair<std::size_t, BundleId>> gradients_on_device;
  std::deque<std::size_t> gradients_waiting;    // parts whose gradients went to the worker
  std::vector<std::shared_future<void>> part_work;
  struct GoingHome {
    std::size_t part;
    BundleId id;
    Fence fence;
  };
  std::deque<GoingHome> going_home;  // the worker's
  detail::SerialWorker worker;

  // Runs f, and records it as a span on `track` when tracing.
  template <typename F>
  void traced(const std::string& name, detail::Track track, F f) {
    if (!tracer->enabled()) return f();
    auto start = detail::Tracer::Clock::now();
    f();
    if (track == detail::Track::kCompute && config.device.is_cuda()) synchronize_gpu();
    tracer->record(name, track, start, detail::Tracer::Clock::now());
  }

  // Runs part `part`'s forward or backward compute, traced; with tracing on, its time also goes
  // to the part's figures in stats.
  template <typename F>
  void computed(std::size_t part, bool forward, F f) {
    const std::string name = (forward ? "forward " : "backward ") + parts[part].name;
    if (!tracer->enabled()) return f();
    auto start = detail::Tracer::Clock::now();
    traced(name, detail::Track::kCompute, f);
    const double seconds = std::chrono::duration<double>(detail::Tracer::Clock::now() - start).count();
    std::vector<double>& figures = forward ? stats.part_forward_seconds : stats.part_backward_seconds;
    figures.resize(parts.size());
    figures[part] += seconds;
  }

  std::shared_ptr<detail::Tracer> tracer;  // shared with the store's on_transfer
  EngineStats stats;
  std::mutex stats_mutex;  // optimizer_seconds is written by the worker
};

}  // namespace ferry
