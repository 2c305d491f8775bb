#pragma once

// What the engine's modes share about their configuration: validation, budgets, and where each
// mode keeps what.

#include "ferry/engine.h"

namespace ferry::detail {

// Throws ferry::Error naming the first invalid field and what would be valid.
void validate(const EngineConfig& config);

// Throws BudgetExceeded naming the tier, what it would hold and the shortfall.
void check_budgets(const TierDemand& needed, const EngineConfig& config);

// Why `mode` cannot start from a staged layout (EngineConfig::staged); empty for fuyou.
std::string unstageable(Mode mode);

// The residency manager's options for the engine's budgets and directories.
StoreOptions store_options(const EngineConfig& config);

// Where a first-order mode (gpu, zero-offload, fuyou) keeps one part's bundles: `params` in the
// compute dtype (modules see views of its device copy), `grads` (whose device copy lives only
// through the part's backward in the offload modes), and `optimizer` for the fp32 master, the
// optimizer states and the gradient accumulator. The optimizer runs on the GPU in gpu mode and
// on the host otherwise, staging what lives on NVMe through host memory.
struct PartHomes {
  Tier params;
  Tier grads;
  Tier optimizer;
};
PartHomes part_homes(const EngineConfig& config, models::Part kind, std::int64_t block);

// Each block's activations: EngineConfig::activations, or what keep_graph_blocks and
// offload_checkpoints say.
std::vector<BlockActivations> block_activations(const EngineConfig& config, std::int64_t blocks);

// fuyou: parts whose gradients may wait on the host for the CPU optimizer beyond the one it is
// updating. Backward waits rather than let more pile up there.
constexpr std::size_t kGradientsAhead = 2;

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
