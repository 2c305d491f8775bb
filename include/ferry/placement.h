#pragma once

// Where a first-order job keeps each part's state and where each part's update runs. A
// placement is a value: the presets (gpu, zero-offload, fuyou) produce a fixed one, the planner's
// auto mode chooses one from the budgets and the measured speeds, and the engine executes
// whichever it is given, with one code path (docs/placement.md).

#include <cstdint>
#include <string>
#include <vector>

#include "ferry/store.h"

namespace ferry {

// What a block keeps between its forward and its backward, and on which tier. A recomputed block
// keeps only its input (its checkpoint) and runs its forward again in backward; otherwise the
// whole autograd graph is kept, which the engine keeps on the device only. Host and NVMe
// checkpoints go down in forward and come back up ahead of the block's backward.
struct BlockActivations {
  bool recompute = true;
  Tier tier = Tier::kGpu;
  std::string describe() const;  // "recompute from gpu", "graph on gpu"
  bool operator==(const BlockActivations& other) const {
    return recompute == other.recompute && tier == other.tier;
  }
};
// "gpu", "host" or "nvme": recompute from a checkpoint on that tier; "graph": keep the graph.
BlockActivations parse_block_activations(const std::string& name);

constexpr int kMaxOptimizerStates = 2;  // Adam's two moments

// One part's home tier for each of its roles. The part is updated on the GPU, by ferry's device
// kernels working in place, when its gradients live there, and then every role must live there
// too. Otherwise the CPU worker updates it, with its gradients, fp32 master, optimizer states and
// accumulator each in host memory or on NVMe (staged through host memory while it works), and
// its parameters anywhere: on the device they stay resident and take the update back over PCIe,
// in host memory or on NVMe they are streamed through the device for every pass.
struct PartPlacement {
  Tier params = Tier::kGpu;  // the compute dtype copy the modules use
  Tier grads = Tier::kGpu;
  Tier master = Tier::kGpu;  // the fp32 master; fp32 training has none (the parameters are it)
  Tier states[kMaxOptimizerStates] = {Tier::kGpu, Tier::kGpu};  // those the optimizer keeps
  Tier accumulator = Tier::kGpu;  // the fp32 gradient sum, with grad_accumulation > 1

  bool updated_on_gpu() const { return grads == Tier::kGpu; }
  bool streamed() const { return params != Tier::kGpu; }
  bool operator==(const PartPlacement& other) const;
  bool operator!=(const PartPlacement& other) const { return !(*this == other); }
};

// A whole job's placement: one entry per part (the stem, every block, the head) and each block's
// activations. Either list may be empty in EngineConfig::placement, where the mode's preset (and,
// for activations, keep_graph_blocks and offload_checkpoints) fill it in.
struct Placement {
  std::vector<PartPlacement> parts;
  std::vector<BlockActivations> activations;
  bool operator==(const Placement& other) const {
    return parts == other.parts && activations == other.activations;
  }
};

// The roles a part of a job has, in the order PartPlacement lists them: parameters and gradients
// always, an fp32 master unless training in fp32, `states` optimizer states, an accumulator with
// gradient accumulation.
struct PlacementRoles {
  bool master = true;
  int states = 2;
  bool accumulator = false;
};

// Per role, how many parts live on each tier, and where the updates run: one line per role,
// e.g. "fp32 master: 12 parts on gpu, 30 on host". For `ferry plan` and the engine's banner.
std::vector<std::string> describe_placement(const Placement& placement, const PlacementRoles& roles);

// The placement as JSON, one entry per part ({"params": "gpu", ...}), and back. Throws
// ferry::Error naming the part, the role and the value for text that is not a placement.
std::string placement_to_json(const Placement& placement);
Placement placement_from_json(const std::string& json_text);

}  // namespace ferry
