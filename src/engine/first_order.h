#pragma once

// The first-order engine: forward, backward and the optimizer, block by block, over any
// placement (ferry/placement.h). Parts updated on the GPU run ferry's device kernels in step();
// the others are updated by the CPU worker, each as soon as its gradients are down (or after
// backward when clipping or loss scaling needs the global norm), concurrently with the device.

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

#include "engine/data_parallel.h"
#include "engine/layout.h"
#include "engine/parts.h"
#include "engine/sizing.h"
#include "engine/trace.h"
#include "engine/trainer.h"
#include "engine/update.h"
#include "engine/window.h"
#include "ferry/engine.h"
#include "ferry/lock.h"
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

// One part in the pipeline: where its roles live and where it is in the step.
struct PartState {
  PartPlacement home;
  optim::GradStats stats;       // of this step's gradients, once measured
  torch::Tensor device_stats;   // measured on the device (measure_on_device), not read yet
  bool updated = false;         // this step's update has been handed to the worker
  Fence upload;                 // the parameters going up to the device
  // The device parameters lack the last (delayed) update: its result waits in the host copy
  // until the part's backward in the next step is done.
  bool stale_on_device = false;
  Fence gradients_down;            // the gradients going down to the host
  dist::Pending reduction;         // the gradients being reduce-scattered across the ranks
  std::shared_future<void> work;   // the worker's latest task for the part

  bool cpu_updated() const { return !home.updated_on_gpu(); }
  // Where the update computes: the device, or host memory for the CPU worker.
  Tier update_tier() const { return home.updated_on_gpu() ? Tier::kGpu : Tier::kHost; }
};

class FirstOrderTrainer final : public Trainer {
 public:
  FirstOrderTrainer(LayeredModel model, EngineConfig config);
  ~FirstOrderTrainer() override;

  torch::Tensor forward(const data::Batch& batch) override;
  void backward(const torch::Tensor& loss) override;
  StepResult step() override;
  std::optional<StepResult> train_step(const data::Batch& batch) override;
  void flush() override;
  torch::Tensor logits(const torch::Tensor& tokens, const torch::Tensor& padding_mask,
                       const torch::Tensor& position_ids = {}) override;

  void quiesce(const char* call) override;
  std::size_t state_count() const override { return static_cast<std::size_t>(optimizer_state_count(config_.optimizer)); }
  nlohmann::json checkpoint_state() const override;
  void restore_state(const nlohmann::json& state) override;
  PartValues read_part(std::size_t part, bool with_states) override;
  torch::Tensor read_frozen(std::size_t part) override;
  void write_part(std::size_t part, const PartValues& values) override;
  bool shards_states() const override { return world_size(config_) > 1; }
  PartShard read_shard(std::size_t part, bool with_parameters) override;
  void write_shard(std::size_t part, const PartShard& values) override;

  const LayeredModel& model() const override { return model_; }
  const EngineConfig& config() const override { return config_; }
  const std::vector<Part>& parts() const override { return parts_; }
  std::int64_t steps() const override { return steps_; }
  EngineStats stats() const override;
  const Tracer& tracer() const override { return *tracer_; }

 private:
  // Setup.
  void allocate_and_bind();
  // Binds the part's modules to its device copies: those a visit may still be uploading, or
  // resident ones.
  void bind_device_copies(std::size_t part, bool in_flight);
  void unbind_decoded_base(std::size_t part);
  TierDemand demand() const;

  // The step: forward, backward and step for one micro-batch at a time (batch-major), or
  // train_step, which runs a whole step in layer-major order once its micro-batches are in.
  StepResult train_layer_major(const std::vector<data::Batch>& batches);
  void check_batch_major(const char* call) const;

  // The passes, over one micro-batch (batch-major) or all of a step's (layer-major).
  void start_step();
  // `micro_batch` is the batch's place in its step, which seeds its dropout masks.
  PendingBackward prepare_micro_batch(const data::Batch& batch, std::int64_t micro_batch) const;
  void forward_blocks(std::vector<PendingBackward>& micro);
  void forward_head(PendingBackward& saved);
  void begin_backward();
  void backward_head(PendingBackward& saved);
  // `summed`: each micro-batch's gradients are folded into the part's fp32 sum on the device.
  void backward_blocks(std::vector<PendingBackward>& micro, bool summed);
  void backward_stem(std::vector<PendingBackward>& micro, bool summed);
  void fold_gradients(std::size_t part, bool first);

  // Parameters on the device. Streamed blocks visit it through `window_`, the others wait for
  // their last upload.
  bool streamed(std::size_t part) const { return state_[part].home.streamed(); }
  std::vector<std::vector<BundleId>> parameter_visits(bool reverse) const;
  void enter_part(std::size_t part);  // the part's parameters are usable by work queued next
  void enter_block(std::size_t block, std::size_t visit);

  // Activation checkpoints, as bundles on their block's tier: host and NVMe ones go down in
  // forward and come back in backward.
  void size_checkpoints(std::uint64_t bytes);  // every micro-batch's checkpoint fits
  void save_checkpoint(std::size_t block, std::size_t micro_batch, const torch::Tensor& hidden,
                       PendingBackward::SavedBlock& saved);
  void release_checkpoints(std::size_t keep);

  // Gradients, per part.
  void collect_gradients(std::size_t part);
  void prepare_gradients(std::size_t part);
  // Evicts device gradients that have gone down, waiting for the oldest while more than `keep`
  // are still on the device.
  void release_gradients(std::size_t keep);
  // A part's gradients are complete: reduced across the ranks, then measured, accumulated and
  // sent to its update. With several ranks the reduction runs while backward goes on, and the
  // rest follows in gradients_reduced once kReductionsInFlight later parts' have started, or at
  // finish_reductions (end of backward).
  void gradients_ready(std::size_t part, bool summed);
  void gradients_reduced(std::size_t part, bool summed);
  void finish_reductions(std::size_t keep);
  void accumulate_and_measure(std::size_t part, bool first_micro_batch, bool last_micro_batch,
                              bool summed_on_device);
  // Where gradients wait on the host for the CPU optimizer, backward lets at most
  // kGradientsAhead parts' wait there beyond the one being updated.
  void limit_gradients_ahead(std::size_t part);

  // The update's side. A bundle whose home is not its part's update tier is staged there:
  // fetched (or only allocated when it is about to be overwritten), changed, committed home and
  // released again.
  Fence stage(std::size_t part, BundleId id, bool overwrite);
  Fence commit(std::size_t part, BundleId id);
  void release_staged(std::size_t part, BundleId id);
  bool staged_on_host(std::size_t part, BundleId id) const;
  void prefetch_optimizer_state(std::size_t part);
  // Evicts staged copies whose commits are done; waits for those of parts after `keep_part`
  // (updated earlier: backward runs from the last part to the first).
  void release_going_home(std::size_t keep_part);
  void drain_going_home();  // waits for every commit and evicts the staged copies
  // Whether the part's update waits for step(): on the GPU always, on the CPU while clipping,
  // loss scaling or a delayed update need every gradient first.
  bool update_waits_for_step(std::size_t part) const;
  // `upload`: the new parameters go up to the device now; otherwise they wait on the host for
  // upload_parameters (a delayed update). `finite`: this rank's shard of the gradients is; a
  // non-finite one skips the update. Either way the parameters are gathered across the ranks.
  bool update(std::size_t part, const UpdateContext& context, bool upload, bool finite = true);
  void gather_parameters(std::size_t part, const torch::Tensor& params);
  void reduce_gradient_stats();
  void wait_for_workers();
  void wait_for_part(std::size_t part);  // the worker is done with the part's earlier tasks
  void read_device_stats();

  // Whole-bundle reads and writes for set-up and checkpoints, through staging where needed.
  torch::Tensor read_bundle(std::size_t part, BundleId id, torch::ScalarType dtype, std::int64_t numel);
  // The part's whole flat range from every rank's shard of it (a collective, in kMain).
  torch::Tensor gather_shards(std::size_t part, const torch::Tensor& shard);
  void write_bundle(std::size_t part, BundleId id, const torch::Tensor& values);

  torch::Tensor view(BundleId id, Tier tier, torch::ScalarType dtype, std::int64_t numel) const;
  BundleId master_bundle(std::size_t part) const;
  // This rank's shard of the part's fp32 master on its update tier.
  torch::Tensor master_view(std::size_t part) const;
  // What the optimizer reads: the fp32 accumulator when there is one, else the raw gradients.
  BundleId gradient_bundle(std::size_t part) const;
  torch::Tensor gradient_view(std::size_t part) const;
  // One-step delayed parameter update (DelayedUpdateConfig): whether the step now running leaves
  // its CPU updates to run during the next one.
  bool delays_update() const;
  void upload_parameters(std::size_t part);

  // Runs f, and records it as a span on `track` when tracing.
  template <typename F>
  void traced(const std::string& name, Track track, F f) {
    if (!tracer_->enabled()) return f();
    auto start = Tracer::Clock::now();
    f();
    if (track == Track::kCompute && config_.device.is_cuda()) synchronize_gpu();
    tracer_->record(name, track, start, Tracer::Clock::now());
  }

  // Runs part `part`'s forward or backward compute, traced; with tracing on, its time also goes
  // to the part's figures in stats.
  template <typename F>
  void computed(std::size_t part, bool forward, F f) {
    const std::string name = (forward ? "forward " : "backward ") + parts_[part].name;
    if (!tracer_->enabled()) return f();
    auto start = Tracer::Clock::now();
    traced(name, Track::kCompute, f);
    const double seconds = std::chrono::duration<double>(Tracer::Clock::now() - start).count();
    std::vector<double>& figures = forward ? stats_.part_forward_seconds : stats_.part_backward_seconds;
    figures.resize(parts_.size());
    figures[part] += seconds;
  }

  LayeredModel model_;
  EngineConfig config_;
  torch::ScalarType compute_dtype_;
  DirectoryLock staged_lock_;  // the staged layout's, for the engine's life (released after the store)
  std::unique_ptr<Store> store_;
  std::optional<NvmeLayout> staged_;  // during set-up only: the staged layout being adopted
  std::vector<Part> parts_;
  Placement placement_;
  std::vector<PartState> state_;  // per part
  std::unique_ptr<DeviceWindow> window_;
  LossScaler scaler_;

  std::int64_t steps_ = 0;          // optimizer steps taken
  std::int64_t micro_batches_ = 0;  // in the current step
  torch::Tensor step_loss_sum_;  // fp64 on the device, over the step's micro-batches
  std::int64_t step_tokens_ = 0;
  double step_lr_ = 0;
  std::optional<PendingBackward> pending_;
  std::vector<data::Batch> buffered_;  // layer-major: the step's micro-batches so far

  CheckpointLayout checkpoints_;  // per block and micro-batch, laid out at the first forward
  std::deque<std::pair<BundleId, Fence>> checkpoints_down_;

  // Parts whose device gradients (or their sum) are not dropped yet, with the bundle sent down.
  std::deque<std::pair<std::size_t, BundleId>> gradients_on_device_;
  std::deque<std::size_t> gradients_waiting_;  // parts whose gradients went to the worker
  std::deque<std::pair<std::size_t, bool>> reducing_;  // parts (and summed) whose reduction is in flight
  struct GoingHome {
    std::size_t part;
    BundleId id;
    Fence fence;
  };
  std::deque<GoingHome> going_home_;  // the worker's
  SerialWorker worker_;

  std::shared_ptr<Tracer> tracer_;  // shared with the store's on_transfer
  EngineStats stats_;
  mutable std::mutex stats_mutex_;  // optimizer_seconds is written by the worker
};

}  // namespace ferry::detail
