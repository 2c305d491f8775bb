// Bytes per role and tier. gpu, zero-offload and zo2 take the engine's own sizing
// (engine_demand); fuyou follows issue 7's placement until the engine runs it. Activations come
// on top, from the block and head costs.

#include <algorithm>

#include "engine/sizing.h"
#include "engine/update.h"
#include "ferry/check.h"
#include "plan/plan_impl.h"

namespace ferry::detail {
namespace {

std::uint64_t round_up(std::uint64_t bytes) { return (bytes + 4095) / 4096 * 4096; }

void add(Sizing* sizing, Tier tier, std::string role, std::uint64_t bytes) {
  if (bytes == 0) return;
  sizing->tier_bytes[static_cast<int>(tier)] += bytes;
  sizing->items.push_back({tier, std::move(role), bytes});
}

Mode engine_mode(PlanMode mode) {
  switch (mode) {
    case PlanMode::kGpu: return Mode::kGpu;
    case PlanMode::kZeroOffload: return Mode::kZeroOffload;
    case PlanMode::kZo2: return Mode::kZo2;
    case PlanMode::kFuyou: break;
  }
  FERRY_ASSERT(false, "fuyou has no engine mode yet");
  return Mode::kGpu;
}

// Note: issue 7's placement. Everything a part owns lives on NVMe. The host holds staging for
// two parts' parameters (one arriving from NVMe, one going up) and three parts' optimizer work
// (states being read, updated, written back), then caches block parameters in what the host
// budget leaves. The GPU holds a window of two parts' parameters and two parts' gradients (one
// in backward, one going down).
void size_fuyou(const PlanRequest& request, const std::vector<PartShape>& parts, Sizing* sizing) {
  const EngineConfig& config = request.engine;
  validate(config);
  FERRY_CHECK(!config.nvme_directories.empty(),
              "fuyou mode keeps parameters and optimizer states on NVMe: pass --nvme DIR[,DIR...]");
  const std::uint64_t e = compute_element_size(config.precision);
  const std::uint64_t states = static_cast<std::uint64_t>(optimizer_state_count(config.optimizer));
  const bool separate_master = config.precision != Precision::kF32;
  std::uint64_t params = 0, master = 0, state_bytes = 0, accumulator = 0, largest = 0;
  for (const PartShape& part : parts) {
    const auto numel = static_cast<std::uint64_t>(part.numel);
    params += round_up(numel * e);
    if (separate_master) master += round_up(numel * 4);
    state_bytes += states * round_up(numel * 4);
    if (config.grad_accumulation > 1) accumulator += round_up(numel * 4);
    largest = std::max(largest, numel);
  }
  add(sizing, Tier::kNvme, "parameters", params);
  add(sizing, Tier::kNvme, "fp32 master", master);
  add(sizing, Tier::kNvme, "optimizer states", state_bytes);
  add(sizing, Tier::kNvme, "gradient accumulator", accumulator);
  add(sizing, Tier::kHost, "parameter staging", 2 * round_up(largest * e));
  add(sizing, Tier::kHost, "optimizer staging",
      3 * (round_up(largest * e) + (states + (separate_master ? 1 : 0)) * round_up(largest * 4)));
  add(sizing, Tier::kGpu, "parameter window", 2 * round_up(largest * e));
  add(sizing, Tier::kGpu, "gradients", 2 * round_up(largest * e));
}

void add_activations(const PlanRequest& request, Sizing* sizing) {
  std::int64_t kept[kTierCount] = {0, 0, 0}, checkpoints[kTierCount] = {0, 0, 0};
  bool rebuilt_on_gpu = false;
  std::uint64_t arriving = 0;
  for (const BlockActivations& block : sizing->activations) {
    (block.recompute ? checkpoints : kept)[static_cast<int>(block.tier)] += 1;
    rebuilt_on_gpu |= block.recompute || block.tier != Tier::kGpu;
    if (block.tier != Tier::kGpu) {
      arriving = std::max(arriving, block.recompute ? sizing->block.checkpoint_bytes : sizing->block.graph_bytes);
    }
  }
  for (Tier tier : {Tier::kGpu, Tier::kHost, Tier::kNvme}) {
    const int t = static_cast<int>(tier);
    if (checkpoints[t] > 0) {
      add(sizing, tier, "checkpoints (" + std::to_string(checkpoints[t]) + " blocks)",
          static_cast<std::uint64_t>(checkpoints[t]) * sizing->block.checkpoint_bytes);
    }
    if (kept[t] > 0) {
      add(sizing, tier, "graphs (" + std::to_string(kept[t]) + " blocks)",
          static_cast<std::uint64_t>(kept[t]) * sizing->block.graph_bytes);
    }
  }
  // Backward needs one block's graph on the device (recomputed or swapped in) with the gradients
  // of its intermediates, and the next block's swapped activations arriving; the head and loss
  // peak before that.
  const std::uint64_t block_backward =
      (rebuilt_on_gpu ? sizing->block.graph_bytes : 0) + sizing->block.backward_working_bytes + arriving;
  add(sizing, Tier::kGpu, "working activations", std::max(sizing->head.peak_bytes, block_backward));
}

}  // namespace

std::uint64_t compute_element_size(Precision precision) { return precision == Precision::kF32 ? 4 : 2; }

std::vector<BlockActivations> engine_activations(const PlanRequest& request) {
  if (request.mode == PlanMode::kZo2) return {};
  const std::int64_t blocks = request.model.num_layers;
  const std::int64_t kept = std::min(blocks, request.engine.keep_graph_blocks);
  std::vector<BlockActivations> out(static_cast<std::size_t>(blocks));
  for (std::int64_t i = 0; i < blocks; ++i) {
    BlockActivations& block = out[static_cast<std::size_t>(i)];
    block.recompute = i < blocks - kept;
    block.tier = block.recompute && request.engine.offload_checkpoints ? Tier::kHost : Tier::kGpu;
  }
  return out;
}

std::uint64_t tier_limit(const PlanRequest& request, Tier tier) {
  const EngineConfig& config = request.engine;
  switch (tier) {
    case Tier::kGpu:
      return config.gpu_budget_bytes ? config.gpu_budget_bytes : request.hardware.gpu_memory_bytes;
    case Tier::kHost:
      return config.host_budget_bytes ? config.host_budget_bytes : request.hardware.host_memory_bytes;
    case Tier::kNvme:
      return config.nvme_budget_bytes;
  }
  return 0;
}

Sizing size_tiers(const PlanRequest& request, const std::vector<BlockActivations>& activations) {
  const models::ModelConfig& model = request.model;
  model.validate();
  FERRY_CHECK(request.batch >= 1, "batch = ", request.batch, " is invalid: it must be at least 1");
  FERRY_CHECK(request.seq >= 1, "seq = ", request.seq, " is invalid: it must be at least 1");
  FERRY_CHECK(model.family == models::Family::kLlama || request.seq <= model.max_position_embeddings,
              "seq = ", request.seq, " is longer than the model's ", model.max_position_embeddings,
              " learned positions: use --seq ", model.max_position_embeddings, " or less");
  FERRY_CHECK(activations.size() == (request.mode == PlanMode::kZo2 ? 0 : static_cast<std::size_t>(model.num_layers)),
              "a placement needs one entry per block: got ", activations.size(), " for ",
              model.num_layers, " blocks");
  Sizing sizing;
  sizing.activations = activations;
  ActivationShape shape{request.batch, request.seq, compute_element_size(request.engine.precision),
                        request.attention == AttentionKernel::kFused};
  sizing.block = block_costs(model, shape);
  sizing.head = head_costs(model, shape);
  const std::vector<PartShape> parts = part_shapes(model);

  if (request.mode == PlanMode::kFuyou) {
    size_fuyou(request, parts, &sizing);
  } else {
    EngineConfig config = request.engine;
    config.mode = engine_mode(request.mode);
    const TierDemand demand = engine_demand(parts, config);
    for (Tier tier : {Tier::kGpu, Tier::kHost, Tier::kNvme}) {
      for (const TierDemand::Item& item : demand.items[static_cast<int>(tier)]) {
        add(&sizing, tier, item.role, item.bytes);
      }
    }
  }

  if (request.mode == PlanMode::kZo2) {
    // Forward only: the hidden states of the + and - forwards, one block's intermediates, and
    // the logits and loss of one forward at a time.
    add(&sizing, Tier::kGpu, "hidden states (+ and -)", 2 * sizing.block.checkpoint_bytes);
    add(&sizing, Tier::kGpu, "working activations",
        std::max(sizing.block.forward_working_bytes, sizing.head.forward_logits_bytes));
    return sizing;
  }
  add_activations(request, &sizing);

  if (request.mode == PlanMode::kFuyou) {
    // The host cache takes what the host budget leaves, a whole block at a time.
    const std::uint64_t block_params =
        round_up(static_cast<std::uint64_t>(model.block_parameter_count()) * shape.element_size);
    const std::uint64_t host_limit = tier_limit(request, Tier::kHost);
    const std::uint64_t host_used = sizing.tier_bytes[static_cast<int>(Tier::kHost)];
    const std::uint64_t room = host_limit > host_used ? host_limit - host_used : 0;
    sizing.cached_blocks = std::min<std::int64_t>(model.num_layers, static_cast<std::int64_t>(room / block_params));
    add(&sizing, Tier::kHost, "parameter cache (" + std::to_string(sizing.cached_blocks) + " blocks)",
        static_cast<std::uint64_t>(sizing.cached_blocks) * block_params);
  }
  return sizing;
}

}  // namespace ferry::detail
