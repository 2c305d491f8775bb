#pragma once

// The engine's set-up, the first-order modes' and zo2's, as one piece of code each that the engine
// performs and its sizing counts: each part's bundles at home, and the pools its step draws every
// copy away from home from. engine_demand runs it against a counting store
// (StoreOptions::count_only), so the bytes `ferry plan` reports per tier are the ones the engine
// takes; and since no copy away from home comes from anywhere but a pool, the step cannot take
// more than the set-up counted.

#include <cstdint>
#include <vector>

#include "engine/data_parallel.h"
#include "engine/parts.h"
#include "ferry/engine.h"
#include "ferry/store.h"

namespace ferry::detail {

// Parts whose gradients, or whose parameters kept for their update, wait on the host for the CPU
// worker beyond the one it is updating: backward waits rather than let more pile up there.
constexpr std::size_t kGradientsAhead = 2;
// Parts whose device gradients (or their fp32 sums) may still be on their way down when the next
// part's backward gets its own: the stem's, kept through backward for a tied head, comes on top.
// One is enough while PCIe moves a part's gradients faster than the device computes the next
// part's backward, and a gpt3-175b block's are 3.6 GB.
constexpr std::size_t kGradientsGoingDown = 1;
// Parts whose gradients are being reduced across the ranks while backward goes on: the next
// part's backward overlaps each reduction. Their device gradients come on top of the others.
constexpr std::size_t kReductionsInFlight = 1;
// Swapped checkpoints on their way down while forward saves the next one.
constexpr std::size_t kCheckpointsGoingDown = 1;
// Parts whose optimizer state is staged on the host at once: the one being updated, the next
// one arriving and the previous one going home.
constexpr std::size_t kPartsStaged = 3;

// Visits the device window holds at once: FuyouConfig::blocks_in_flight when blocks stream, else
// two (the checkpoints a block's backward brings back, and the next block's).
std::size_t window_capacity(const EngineConfig& config, const Placement& placement);

// The parts of `shapes` as the set-up sizes them: names, kinds and parameter counts, no slices
// or modules. count_first_order lays them out; the planner times their visits.
std::vector<Part> parts_of(const std::vector<PartShape>& shapes);

// The bytes a visit brings to the device as the store moves them: the part's parameters bundle
// and its frozen one (an fp8 base at one byte an element and its scales), each a whole bundle.
std::uint64_t visit_bytes(const Part& part, const EngineConfig& config);
// The frozen bundle's share of it (0: none), which a zo2 visit brings beside the stored weights.
std::uint64_t frozen_visit_bytes(const Part& part, const EngineConfig& config);

// Records what a set-up takes, role by role, into a TierDemand.
void record(TierDemand* demand, Tier tier, const char* role, std::uint64_t bytes);

// Reserves the step's pools on `store` (parts described, bundles not yet added) and adds every
// part's bundles at home through `add` (the engine places them, or adopts a staged layout's).
StepPools lay_out_parts(Store& store, std::vector<Part>& parts, const Placement& placement,
                        const EngineConfig& config, const Ranks& ranks, const AddBundle& add, TierDemand* demand);

// Activation checkpoints of `bytes` each (one block's input for one micro-batch): a bundle per
// recomputed block and micro-batch of a step at its activations' tier, and the pools of their
// copies in flight.
struct CheckpointLayout {
  std::uint64_t bytes = 0;
  std::vector<BundleId> bundles;  // [block * micro-batches + micro-batch]; kNoBundle for a kept graph
  PoolId device = kNoPool;   // gpu: swapped checkpoints while on the device
  PoolId staging = kNoPool;  // host: NVMe checkpoints passing through
};
// Removes `layout`'s bundles and pools (none may be in use) and lays out new ones.
void lay_out_checkpoints(Store& store, const std::vector<Part>& parts, const Placement& placement,
                         const EngineConfig& config, std::uint64_t bytes, CheckpointLayout& layout,
                         TierDemand* demand);

// The set-up of `ranks`' rank counted: TierDemand of `parts`, with checkpoints of
// `checkpoint_bytes` when not 0.
TierDemand count_first_order(const std::vector<PartShape>& parts, const EngineConfig& config,
                             std::uint64_t checkpoint_bytes, const Ranks& ranks);

// --- zo2 --------------------------------------------------------------------------------------

// One part's zo2 bundles. A part without trained parameters (a LoRA stem or head) has none of
// these: only its frozen bundle (Part::frozen, with them at `home`), which is never perturbed,
// updated or written back.
struct ZoBundles {
  Tier home = Tier::kGpu;
  BundleId weights = kNoBundle;  // storage dtype, at home
  std::vector<BundleId> states;  // fp32, at home
  BundleId compute = kNoBundle;  // compute dtype, on the device: the part's own or a block slot
  // A compressed block (zo.transfer): the copy that is uploaded in place of `weights`, at home
  // on the host. The weights and states never leave home; the CPU updates them there.
  bool compressed = false;
  BundleId transfer = kNoBundle;
};

struct ZoLayout {
  std::vector<ZoBundles> parts;
  PoolId window = kNoPool;        // gpu: the streamed blocks' visits in flight
  PoolId nvme_staging = kNoPool;  // host: what lives on NVMe, passing through
};

// Reserves zo2's pools on `store` and adds every part's bundles at home, zero-filled (zo.gpu_blocks
// resolved; `parts` described, their frozen bundles not yet added: Part::frozen is set here). The
// device window holds zo.blocks_in_flight visits.
ZoLayout lay_out_zo(Store& store, std::vector<Part>& parts, const EngineConfig& config, TierDemand* demand);

// zo2's set-up counted (zo.gpu_blocks resolved).
TierDemand count_zo(const std::vector<PartShape>& parts, const EngineConfig& config);

}  // namespace ferry::detail
