#pragma once

// A part of the model (the stem, one block, the head) as the engine holds it: its parameters
// packed into bundles of the residency manager, and the module rebound to views of them.

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/types.h>

#include "engine/sizing.h"
#include "ferry/engine.h"
#include "ferry/model.h"
#include "ferry/store.h"

namespace ferry::detail {

// Note: a part's parameters are laid out in its bundles with every decayed parameter first and
// the norms and biases after them, so the optimizer sees two contiguous ranges per part rather
// than one call per tensor. Offsets are in elements; every bundle of the part uses the same ones.
struct ParameterSlice {
  std::string name;  // relative to the part, as the module registers it ("mlp.up_proj.weight")
  torch::Tensor parameter;
  std::int64_t offset = 0;
  std::vector<std::int64_t> shape;
  std::int64_t numel = 0;
};

// Which bundles a part has depends on the precision, the optimizer and the accumulation; absent
// ones are kNoBundle.
constexpr BundleId kNoBundle = UINT32_MAX;

struct Part {
  std::string name;  // "stem", "block.3", "head"
  models::Part kind = models::Part::kBlock;
  std::int64_t index = 0;  // the block number
  std::vector<ParameterSlice> slices;
  std::int64_t numel = 0;
  std::int64_t decay_numel = 0;

  // Each on its home tier (PartPlacement).
  BundleId params = kNoBundle;  // compute dtype; modules see views of its device copy
  BundleId grads = kNoBundle;   // compute dtype; collect_gradients copies .grad into its device copy
  BundleId master = kNoBundle;  // fp32, when the compute dtype is not
  std::vector<BundleId> states;  // fp32
  BundleId accumulator = kNoBundle;  // fp32 gradient sum over micro-batches, when there are several
};

// The parts of a model in execution order: stem, blocks, head. Slices are laid out, bundles
// not yet allocated.
std::vector<Part> describe_parts(const LayeredModel& model);

torch::ScalarType scalar_type(Precision precision);

// Registers a first-order mode's bundles of one part, in the engine's order and sizes: params
// and grads (compute dtype), the fp32 master (when the compute dtype is not fp32), the optimizer
// states, the gradient accumulator (grad_accumulation > 1), and records the ids `add` returns.
// Note: the engine and `ferry stage` both lay out bundles through this call, so a staged NVMe
// layout is exactly the one the engine allocates; `add` decides how each is placed (allocated,
// adopted from a staged layout, or skipped by staging when it is not at home on NVMe).
void add_bundles(Part& part, const PartPlacement& home, const EngineConfig& config,
                 const std::function<BundleId(const BundleSpec&)>& add);

// A batch's padding mask on `device`, or none when it has no padding: a host mask of all ones
// (packed rows, or rows that fill the sequence) is dropped. The model then runs plain causal
// attention, which is the same attention, and SDPA takes its flash kernel instead of the
// masked one. Only a host mask is read: a device one would stall the host until the device
// caught up.
torch::Tensor device_padding_mask(const torch::Tensor& mask, torch::Device device);

// Moves what is not a parameter (buffers) to the device; parameters move into bundles.
void move_buffers(const LayeredModel& model, torch::Device device);

// Points every slice's parameter at its range of `flat` (a part's bundle viewed as its dtype).
void bind_parameters(const Part& part, const torch::Tensor& flat);

// A flat view of a bundle's copy on `tier` as `dtype`, numel elements long.
torch::Tensor typed_view(const Store& store, BundleId id, Tier tier, torch::ScalarType dtype,
                         std::int64_t numel);
// The same for the device copy while an upload into it may still be in flight, for work queued
// behind that upload (Store::device_tensor_in_flight).
torch::Tensor typed_device_view(const Store& store, BundleId id, torch::ScalarType dtype,
                                std::int64_t numel);

}  // namespace ferry::detail
