#pragma once

// Engine checkpoints (checkpoint.cpp), written and read one part at a time, so that a model far
// larger than host memory (fuyou, zo2 with NVMe homes) is never staged whole: the host holds one
// part's fp32 weights and states at a time, besides the headers.

#include <cstddef>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/types.h>

#include "engine/parts.h"
#include "engine/trainer.h"
#include "ferry/engine.h"
#include "ferry/model.h"

namespace ferry::detail {

// Called once per part, in order; the values it returns are released before the next call.
using PartProducer = std::function<PartValues(std::size_t part)>;
// Called once per part, in order, after the whole checkpoint has been checked.
using PartConsumer = std::function<void(std::size_t part, PartValues values)>;

// Writes the checkpoint `dir` atomically: weights as safetensors under Hugging Face names (with
// config.json when the model has one), `state_count` optimizer states per parameter in
// optimizer.safetensors, and `state` (plus format, optimizer and every tensor's XXH64 by file)
// as trainer_state.json. Staged in "<dir>.partial" through `env`, every file fsynced, then
// swapped in and the parent fsynced, so a failure or a crash leaves the previous checkpoint.
void write_checkpoint(const std::string& dir, const LayeredModel& model,
                      const std::vector<Part>& parts, OptimizerKind kind,
                      std::size_t state_count, const nlohmann::json& state,
                      const PartProducer& produce, Env* env = nullptr);

// The writer under write_checkpoint, also used alone for a weights-only export: weights in
// `weight_dtype` (converted from the fp32 values produced), one fp32 optimizer state per name in
// `states`, trainer_state.json (with the checksums added) unless `trainer_state` is null, and
// `extra_files` (name -> contents). Staged and swapped in the same way.
void write_weights_directory(const std::string& dir, const LayeredModel& model,
                             const std::vector<Part>& parts, DType weight_dtype,
                             const std::vector<std::string>& states, const nlohmann::json& trainer_state,
                             const std::map<std::string, std::string>& extra_files,
                             const PartProducer& produce, Env* env = nullptr);

// Checks every tensor's name, shape and dtype in the headers of `dir` against `parts` (weights,
// and `state_count` states each), then reads and hands over one part at a time. A checkpoint
// that does not fit the model throws before the first call to `consume`. The tensors read are
// checked against `checksums` (trainer_state.json's; null for a checkpoint that has none) as
// `verify` says; a mismatch throws, naming the tensor and its file, when it is read.
void read_checkpoint(const std::string& dir, const LayeredModel& model,
                     const std::vector<Part>& parts, OptimizerKind kind,
                     std::size_t state_count, const nlohmann::json& checksums, Verify verify,
                     const PartConsumer& consume);

}  // namespace ferry::detail
