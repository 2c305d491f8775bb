#pragma once

// The planner's pieces: sizing the tiers for an engine configuration (placement.cpp) and
// replaying one step on the six resources (schedule.cpp). make_plan (plan.cpp) searches over
// activation placements, host blocks, batches and alternatives with them.

#include <cstdint>
#include <vector>

#include "ferry/plan.h"
#include "plan/costs.h"

namespace ferry::detail {

std::uint64_t compute_element_size(Precision precision);

// Whether a plan item is autograd's (kept graphs, working activations) rather than the store's.
bool is_activation(const std::string& role);

// The request's activations as the engine places them: engine.placement.activations, or the last
// keep_graph_blocks blocks keep their graph on the GPU and the others recompute from a checkpoint
// on the GPU, or on the host with offload_checkpoints. Empty for zo2.
std::vector<BlockActivations> engine_activations(const PlanRequest& request);

// The bytes of one block's parameters in the compute precision, as the engine stores them.
std::uint64_t block_parameter_bytes(const PlanRequest& request);

// The tier's limit: the budget, or what the hardware has when the budget is 0 (NVMe: unlimited).
std::uint64_t tier_limit(const PlanRequest& request, Tier tier);

struct Sizing {
  // What the engine runs: request.engine with activations (one per block; none for zo2) and, for
  // fuyou, host_blocks filled in.
  EngineConfig config;
  Placement placement;  // resolved, one entry per part (first-order modes)
  std::vector<PlanItem> items;
  std::uint64_t tier_bytes[kTierCount] = {0, 0, 0};
  BlockCosts block;
  HeadCosts head;
};

// Throws ferry::Error for settings the engine would reject.
Sizing size_tiers(const PlanRequest& request, const EngineConfig& config);

struct StepPrediction {
  double step_seconds = 0;
  double executed_flops = 0;  // recomputation and attention included
  double busy_seconds[kResourceCount] = {};
  std::uint64_t moved_bytes[kResourceCount] = {};
  std::vector<PlanSpan> spans;
};

StepPrediction predict_step(const PlanRequest& request, const Sizing& sizing);

}  // namespace ferry::detail
