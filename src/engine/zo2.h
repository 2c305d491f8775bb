#pragma once

// The zo2 mode (ZO2, Wang et al. 2025, over MeZO): forward-only training with the blocks'
// weights at home on host memory or NVMe, streamed through a window of device slots. See
// docs/zo2.md.

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <vector>

#include "engine/layout.h"
#include "engine/parts.h"
#include "engine/trace.h"
#include "engine/trainer.h"
#include "engine/update.h"
#include "engine/window.h"
#include "ferry/engine.h"
#include "ferry/zo.h"

namespace ferry::detail {

// Note: a struct in all but name: its members are the mode's state, open to zo2.cpp's helpers.
class Zo2Trainer final : public Trainer {
 public:
  Zo2Trainer(LayeredModel model, EngineConfig config);
  ~Zo2Trainer() override;

  // No backward pass: forward, backward and step throw, naming train_step.
  torch::Tensor forward(const data::Batch& batch) override;
  void backward(const torch::Tensor& loss) override;
  StepResult step() override;
  std::optional<StepResult> train_step(const data::Batch& batch) override;
  // Logits through the same block streaming, after applying any deferred update.
  torch::Tensor logits(const torch::Tensor& tokens, const torch::Tensor& padding_mask,
                       const torch::Tensor& position_ids = {}) override;
  // Applies the updates not yet applied everywhere and sends every part home up to date.
  void flush() override;

  void quiesce(const char* call) override;
  std::size_t state_count() const override {
    return static_cast<std::size_t>(detail::optimizer_state_count(config_.optimizer));
  }
  nlohmann::json checkpoint_state() const override;
  void restore_state(const nlohmann::json& state) override;
  PartValues read_part(std::size_t part, bool with_states) override;
  void write_part(std::size_t part, const PartValues& values) override;
  torch::Tensor read_frozen(std::size_t part) override;

  const LayeredModel& model() const override { return model_; }
  const EngineConfig& config() const override { return config_; }
  const std::vector<Part>& parts() const override { return parts_; }
  std::int64_t steps() const override { return steps_; }
  EngineStats stats() const override;
  const Tracer& tracer() const override { return *tracer_; }

  // Checkpoint access: the weights (fp32 on the host) and optimizer states of one part. Both
  // need a flushed engine.
  torch::Tensor read_weights(std::size_t part);
  std::vector<torch::Tensor> read_states(std::size_t part);
  void write_home(std::size_t part, const torch::Tensor& weights, const std::vector<torch::Tensor>& states);
  // One bundle of a part as fp32 on the host, read from its home (through host for NVMe).
  torch::Tensor read_home(std::size_t part, BundleId id, torch::ScalarType dtype);

  // One step's update, numbered from 1 over the steps that were not skipped.
  struct PendingUpdate {
    std::int64_t number = 0;  // 1 for the first update
    std::int64_t step = 0;
    double lr = 0;
    std::vector<std::uint64_t> seeds;
    std::vector<double> projected_grads;
  };

  // One forward of every part: its perturbation (scale 0: none) and the hidden state flowing
  // through the parts, the logits at the end; with labels, the loss in their place.
  struct Pass {
    std::uint64_t seed = 0;
    float scale = 0;
    torch::Tensor hidden;
  };

  // The worker that applies updates to the compressed blocks and encodes their next transfer
  // copies (see the Note in zo2.cpp).
  class Encoder;

  void allocate_and_bind();
  // The compressed part's stored weights and states (host memory) and its transfer copy on `tier`.
  optim::ZoTensors stored_tensors(std::size_t part) const;
  optim::ZoTransferCopy transfer_copy(std::size_t part, Tier tier) const;
  // Starts the encoder on every compressed part whose stored copy lacks updates.
  void start_encoding();
  // Waits until part p's stored copy and transfer copy hold every update (a no-op for parts the
  // encoder is not working on).
  void await_encoded(std::size_t part);
  void finish_encoding();
  void mark_encoded(std::size_t part);
  void write_segment_ends(std::size_t part);
  // Runs the passes (none: a flush) through every part; `labels` (or undefined) turns each pass's
  // logits into its loss as soon as the head is done.
  void sweep(std::vector<Pass>& passes, const StepContext& context, const torch::Tensor& tokens,
             const torch::Tensor& labels);
  // One zo kernel over the part: the updates, then the pass's compute copy; `opposite_in_place`:
  // the opposite perturbation's copy too, written over the part's device weights.
  void apply(std::size_t part, const std::vector<optim::ZoUpdate>& updates, const Pass* pass,
             bool opposite_in_place = false);
  optim::ZoUpdate update_for(std::size_t part, const PendingUpdate& pending) const;
  // Whether this sweep writes part p's updated copy home (see the Note in zo2.cpp).
  bool writes_back(std::size_t part, bool flushing) const;
  // The pass whose copy the kernel of the pass before it writes over part p's device weights,
  // when `dropped` (the copy does not go home); SIZE_MAX: none (see the Note in zo2.cpp).
  std::size_t opposite_in_place(std::size_t part, bool dropped, const std::vector<Pass>& passes) const;

  LayeredModel model_;
  EngineConfig config_;
  torch::ScalarType compute_dtype;
  torch::ScalarType storage_dtype;
  std::unique_ptr<Store> store;
  std::vector<Part> parts_;
  std::vector<ZoBundles> bundles;  // by part (lay_out_zo)

  // Updates not yet in every part's stored copy at home, oldest first.
  std::deque<PendingUpdate> updates;
  std::int64_t update_count = 0;           // updates made so far
  std::vector<std::int64_t> home_updates;  // per part: the updates its stored copy at home has
  bool flushed() const;

  std::unique_ptr<detail::DeviceWindow> window;  // blocks streamed from host or NVMe

  std::unique_ptr<Encoder> encoder;     // null when idle
  std::vector<std::size_t> encoding;    // the encoder's parts, in its order
  std::int64_t encoding_updates = 0;    // the updates their stored copies will have
  std::vector<int> segment_counts;      // per part: its fp8 transfer copy's segments

  // Ends part p's compute span from `start` (config.trace: the device is synchronized first).
  void record_compute(std::size_t part, detail::Tracer::Clock::time_point start);

  std::int64_t steps_ = 0;
  EngineStats stats_;
  std::shared_ptr<detail::Tracer> tracer_;  // shared with the store's on_transfer and the encoder
};

}  // namespace ferry::detail
