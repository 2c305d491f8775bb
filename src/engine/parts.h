#pragma once

// A part of the model (the stem, one block, the head) as the engine holds it: its parameters
// packed into bundles of the residency manager, and the module rebound to views of them.

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/types.h>

#include "engine/data_parallel.h"
#include "engine/sizing.h"
#include "ferry/engine.h"
#include "ferry/model.h"
#include "ferry/store.h"
#include "ferry/zo.h"

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

// Note: a part's parameters fall into two groups. The trainable ones (requires_grad) are `slices`,
// with every bundle below; the frozen ones (requires_grad = False: a LoRA base) are
// `frozen_slices`, packed in registration order into the `frozen` bundle alone: no gradients,
// master or optimizer states, never decayed and never written back. The frozen bundle lives with
// the parameters (PartPlacement::params) and visits the device with them; a part may have either
// group empty, not both.
struct Part {
  std::string name;  // "stem", "block.3", "head"
  models::Part kind = models::Part::kBlock;
  std::int64_t index = 0;  // the block number
  std::vector<ParameterSlice> slices;
  std::int64_t numel = 0;
  std::int64_t decay_numel = 0;
  // This rank's range of [0, numel): its fp32 master (when separate from the parameters) and
  // optimizer states hold only it; the parameters, gradients and accumulator are whole.
  Shard shard;
  std::vector<ParameterSlice> frozen_slices;
  std::int64_t frozen_numel = 0;
  std::int64_t frozen_channels = 0;  // output channels: a matrix's rows, a vector's elements

  bool trainable() const { return numel > 0; }

  // Each on its home tier (PartPlacement).
  BundleId params = kNoBundle;  // compute dtype; modules see views of its device copy
  BundleId grads = kNoBundle;   // compute dtype; collect_gradients copies .grad into its device copy
  BundleId master = kNoBundle;  // fp32, when the compute dtype is not
  std::vector<BundleId> states;  // fp32
  BundleId accumulator = kNoBundle;  // fp32 gradient sum over micro-batches, when there are several
  BundleId frozen = kNoBundle;  // compute dtype, read-only; modules see views of its device copy
};

// Note: with BaseStorage::kFp8 a block's frozen bundle holds [channel ends (int64) | scales (fp32)
// | codes (one byte an element)], each channel's codes scaled to fp8's whole range (the zo
// transfer codec, optim::zo_update_and_encode), so one upload carries all of it and the device
// decodes it with optim::zo_perturb_transfer_cuda into a compute-dtype copy the module binds.
bool fp8_frozen(const Part& part, const EngineConfig& config);
std::uint64_t frozen_bytes(const Part& part, const EngineConfig& config);
// The codec's view of an fp8 frozen bundle's bytes at `bundle` (codes, scales and ends in place).
optim::ZoTransferCopy fp8_frozen_copy(const Part& part, void* bundle);
// The fp8 bundle at `bundle` (memory on `device`) decoded to `dtype`, on the current stream.
torch::Tensor decode_fp8_frozen(const Part& part, void* bundle, torch::ScalarType dtype, torch::Device device);
// The fp8 bundle's bytes for `values` (the frozen parameters in fp32, packed as frozen_slices).
torch::Tensor encode_fp8_frozen(const Part& part, const torch::Tensor& values);
// Refuses base storage fp8 when no block of `parts` has frozen parameters to store in it.
void check_base_storage(const std::vector<Part>& parts, const EngineConfig& config);

// Note: frozen parameters are written once, at set-up, straight into their home copy (through
// the NVMe staging for an NVMe home), and never staged for an update or written back; reads
// (exports) go the same way. Both modes keep them so (first_order.cpp, zo2.cpp).
// Writes `values` (fp32, packed as frozen_slices) into the part's frozen bundle at its home: in
// the compute dtype, or encoded (fp8_frozen).
void write_frozen(Store& store, const Part& part, const EngineConfig& config, const torch::Tensor& values);
// The part's frozen parameters read back from home, in fp32 on the host (an fp8 base decoded);
// empty when it has none.
torch::Tensor read_frozen(Store& store, const Part& part, const EngineConfig& config);
// Binds the part's frozen parameters to its frozen bundle's device copy: the copy a visit may still
// be uploading (`in_flight`, read behind the upload on the current stream) or a resident one. An
// fp8 base is decoded into a compute-dtype copy on the current stream, which the modules hold until
// unbind_frozen.
void bind_frozen_device_copy(const Store& store, const Part& part, const EngineConfig& config, bool in_flight);
// Points the part's frozen parameters at empty tensors on the device, so that the modules keep
// neither a decoded base nor a device copy that is dropped.
void unbind_frozen(const Part& part, const EngineConfig& config);

// The parts of a model in execution order: stem, blocks, head. Slices are laid out, bundles
// not yet allocated.
std::vector<Part> describe_parts(const LayeredModel& model);

torch::ScalarType scalar_type(Precision precision);

// The pools a first-order step draws the copies of bundles away from home from (engine/layout.h):
// kNoPool where the placement has nothing to put in one, and everywhere for a layout that only
// stages (`ferry stage`).
struct StepPools {
  PoolId window = kNoPool;              // gpu: streamed blocks' parameters visiting the device
  PoolId device_gradients = kNoPool;    // gpu: gradients of CPU-updated parts, from backward until down
  PoolId device_sums = kNoPool;         // gpu: their fp32 sums over a step's micro-batches (layer-major)
  PoolId parameter_staging = kNoPool;   // host: resident parameters the CPU updates
  PoolId nvme_staging = kNoPool;        // host: copies of what lives on NVMe
};

// Adds a bundle; `role` names what it holds for the sizing ("parameters", "fp32 master", ...).
using AddBundle = std::function<BundleId(const BundleSpec& spec, const char* role)>;

// Registers a first-order part's bundles in the engine's order and sizes: params and grads
// (compute dtype), the fp32 master (when the compute dtype is not fp32), the optimizer states,
// the gradient accumulator (grad_accumulation > 1), each at its home with its copies elsewhere
// drawing from `pools`, and records the ids `add` returns.
// Note: the engine, its sizing and `ferry stage` all lay out bundles through this call, so a
// staged NVMe layout is exactly the one the engine allocates and the sizing counts what the
// engine takes; `add` decides how each is placed (allocated, counted, adopted from a staged
// layout, or skipped by staging when it is not at home on NVMe).
void add_bundles(Part& part, const PartPlacement& home, const EngineConfig& config, const StepPools& pools,
                 const AddBundle& add);

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
void bind_frozen(const Part& part, const torch::Tensor& flat);

// The parameters of `slices` packed flat, in fp32 on the host (`numel` in all).
torch::Tensor pack_slices(const std::vector<ParameterSlice>& slices, std::int64_t numel);

// A flat view of a bundle's copy on `tier` as `dtype`, numel elements long.
torch::Tensor typed_view(const Store& store, BundleId id, Tier tier, torch::ScalarType dtype,
                         std::int64_t numel);
// The same for the device copy while an upload into it may still be in flight, for work queued
// behind that upload (Store::device_tensor_in_flight).
torch::Tensor typed_device_view(const Store& store, BundleId id, torch::ScalarType dtype,
                                std::int64_t numel);

}  // namespace ferry::detail
