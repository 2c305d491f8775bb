#pragma once

// What the engine's modes share about their configuration: validation, budgets, and where each
// part keeps what.

#include "engine/data_parallel.h"
#include "ferry/engine.h"

namespace ferry::detail {

// Throws ferry::Error naming the first invalid field and what would be valid.
void validate(const EngineConfig& config);

// The store's share of the gpu budget: the budget less what is left for activations (0: none).
std::uint64_t store_gpu_budget(const EngineConfig& config);

// engine_demand for one rank of `ranks.world_size`: engine_demand's is the communicator's world,
// the planner's rank 0 of a planned one (ZeRO-2's shards are largest there).
TierDemand rank_demand(const std::vector<PartShape>& parts, const EngineConfig& config,
                       std::uint64_t checkpoint_bytes, const Ranks& ranks);

// Throws BudgetExceeded naming the tier, what it would hold and the shortfall.
void check_budgets(const TierDemand& needed, const EngineConfig& config);

// Why `mode` cannot start from a staged layout (EngineConfig::staged); empty for fuyou.
std::string unstageable(Mode mode);

// The residency manager's options for the engine's budgets and directories.
StoreOptions store_options(const EngineConfig& config);

// A first-order job's placement in full: EngineConfig::placement's parts (mode auto) or the mode's
// preset, and every block's activations. Throws ferry::Error for one the engine cannot run,
// naming the part, the role and what would be valid.
Placement resolve_placement(const EngineConfig& config, std::size_t part_count);
// The preset's homes for part `part` of `count` (mode gpu, zero-offload or fuyou).
PartPlacement preset_part_placement(const EngineConfig& config, std::size_t part, std::size_t count);
// The roles the job's parts have.
PlacementRoles placement_roles(const EngineConfig& config);

// Each block's activations: the placement's, or what keep_graph_blocks and offload_checkpoints say.
std::vector<BlockActivations> block_activations(const EngineConfig& config, std::int64_t blocks);

// zo2: device slots that hold blocks' perturbed compute copies (see zo2.cpp).
constexpr std::size_t kZoComputeSlots = 2;

// Where block `block` of `blocks` keeps its weights in zo2 mode: zo.gpu_blocks of them (resolved)
// resident on the device, spread evenly with block 0 among them (see the Note in sizing.cpp); with
// nvme, the first zo.host_blocks of the others in host memory.
Tier zo_block_home(const ZoConfig& zo, std::int64_t block, std::int64_t blocks);
Precision zo_storage(const EngineConfig& config);

// zo2: whether block `block` crosses PCIe as a compressed copy (zo.transfer), and that copy's
// bytes. An fp8 copy starts with its scale table (segment ends as int64, then the scales as
// fp32) in kZoTransferTableBytes, room for 341 parameter tensors; the codes follow.
bool zo_compressed(const ZoConfig& zo, std::int64_t block, std::int64_t blocks);
constexpr std::uint64_t kZoTransferTableBytes = 4096;
constexpr std::int64_t kZoMaxTransferSegments = kZoTransferTableBytes / 12;
std::uint64_t zo_transfer_bytes(ZoTransfer transfer, std::int64_t numel);

}  // namespace ferry::detail
