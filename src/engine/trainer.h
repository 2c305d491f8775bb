#pragma once

// The interface the public Engine forwards to. The first-order engine (engine.cpp) and zo2
// (zo2.cpp) implement it over the same core: the parts, the residency manager and the device
// window. Checkpoints (checkpoint.cpp) go through it one part at a time.

#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/types.h>

#include "engine/parts.h"
#include "engine/trace.h"
#include "ferry/engine.h"

namespace ferry::detail {

// One part's fp32 weights and optimizer states on the host, as a checkpoint holds them: flat,
// contiguous, part.numel elements each, laid out as the part's slices.
struct PartValues {
  torch::Tensor weights;
  std::vector<torch::Tensor> states;
};

// One part as a rank of several holds it (ZeRO stage 2), and as a checkpoint of several ranks
// stores it: the whole parameters, and this rank's shard (Part::shard) of the fp32 master and the
// optimizer states. On the host, flat and contiguous.
struct PartShard {
  torch::Tensor parameters;  // part.numel: the compute dtype's values, held in fp32
  torch::Tensor master;      // shard.numel fp32; undefined where the compute dtype is fp32 (the
                             // parameters are then the master)
  std::vector<torch::Tensor> states;  // shard.numel fp32 each
};

class Trainer {
 public:
  virtual ~Trainer() = default;

  // The first-order passes; zo2 has only train_step.
  virtual torch::Tensor forward(const data::Batch& batch) = 0;
  virtual void backward(const torch::Tensor& loss) = 0;
  virtual StepResult step() = 0;
  virtual std::optional<StepResult> train_step(const data::Batch& batch) = 0;
  virtual void flush() = 0;
  // The model's logits with the latest parameters (after flushing), through the same streaming.
  // position_ids, when given, restart where packed documents start (LayeredModel::make_context).
  virtual torch::Tensor logits(const torch::Tensor& tokens, const torch::Tensor& padding_mask,
                               const torch::Tensor& position_ids = {}) = 0;

  // Checkpoints. quiesce() flushes and waits for every transfer, so the parts can be read or
  // written; it throws, naming `call`, between the micro-batches of a step.
  virtual void quiesce(const char* call) = 0;
  virtual std::size_t state_count() const = 0;  // optimizer states per parameter
  // The step count and what else a resumed run needs (loss scale, zo2's update count).
  virtual nlohmann::json checkpoint_state() const = 0;
  virtual void restore_state(const nlohmann::json& state) = 0;
  // One part's fp32 weights (the master) and, with `with_states`, its optimizer states. Where
  // shards_states(), every rank must read every trainable part in the same order (the ranks'
  // shards are gathered); write_part then keeps only this rank's shard.
  virtual PartValues read_part(std::size_t part, bool with_states) = 0;
  virtual void write_part(std::size_t part, const PartValues& values) = 0;
  // Whether each rank holds only its shard (Part::shard) of the optimizer states: the first-order
  // trainer with several ranks. save() then has every rank write its own shard (read_shard).
  virtual bool shards_states() const { return false; }
  // This rank's shard of one trainable part, with its whole parameters when `with_parameters`,
  // and no collective. write_shard takes the same: the parameters (whole, in any floating dtype),
  // the master shard where the compute dtype is not fp32, and the states' shards. Only the
  // trainers whose parts have shards (the first-order one) implement them.
  virtual PartShard read_shard(std::size_t part, bool with_parameters);
  virtual void write_shard(std::size_t part, const PartShard& values);
  // One part's frozen parameters (Part::frozen_slices) in fp32 on the host; empty when none.
  virtual torch::Tensor read_frozen(std::size_t part) = 0;

  virtual const LayeredModel& model() const = 0;
  virtual const EngineConfig& config() const = 0;
  virtual const std::vector<Part>& parts() const = 0;
  virtual std::int64_t steps() const = 0;
  virtual EngineStats stats() const = 0;
  virtual const Tracer& tracer() const = 0;
};

std::unique_ptr<Trainer> make_first_order_trainer(LayeredModel model, EngineConfig config);
std::unique_ptr<Trainer> make_zo2_trainer(LayeredModel model, EngineConfig config);

}  // namespace ferry::detail
