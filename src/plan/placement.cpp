// Bytes per role and tier: the engine's own sizing (engine_demand) for every mode, with the
// activations on top, from the block and head costs.

#include <algorithm>

#include "engine/sizing.h"
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

// Note: the activations are counted tensor by tensor from the families' code, within a few percent
// of what a step holds (tests/plan/engine_sizing_test.cpp); autograd's own buffers and the caching
// allocator's rounding come on top. On the GPU machine a 6-block llama-1.3b auto job held 17 MB
// (1%) more than its planned 1.46 GiB of working activations: the plan leaves a twentieth of them
// free besides on a CUDA device, so the allocator's peak stays within the GPU budget.
void add_headroom(Sizing* sizing, const Hardware& hardware) {
  if (hardware.gpu_is_host) return;  // the CPU's allocator: no cache to round into
  std::uint64_t activations = 0;
  for (const PlanItem& item : sizing->items) {
    if (item.tier == Tier::kGpu && is_activation(item.role)) activations += item.bytes;
  }
  add(sizing, Tier::kGpu, "allocator headroom", activations / 20);
}

// Note: what autograd holds beside the store's bundles. The engine counts the checkpoints and
// their copies in flight (engine_demand); kept graphs and the working activations are the
// allocator's. In the layer-major order (GreedySnake, first_order.cpp's train_layer_major) every
// micro-batch passes through a block before the next block comes, so each block keeps the
// activations of all M micro-batches. The head still runs one micro-batch at a time, and backward
// one micro-batch's graph at a time.
void add_activations(Sizing* sizing) {
  const bool layer_major = sizing->config.micro_batch_order == MicroBatchOrder::kLayerMajor;
  const std::int64_t micro_batches = layer_major ? sizing->config.grad_accumulation : 1;
  std::int64_t kept = 0;
  bool rebuilt_on_gpu = false;
  for (const BlockActivations& block : sizing->placement.activations) {
    kept += block.recompute ? 0 : 1;
    rebuilt_on_gpu |= block.recompute;
  }
  const std::string per_block = layer_major ? " x " + std::to_string(micro_batches) + " batches" : "";
  if (kept > 0) {
    add(sizing, Tier::kGpu, "graphs (" + std::to_string(kept) + " blocks" + per_block + ")",
        static_cast<std::uint64_t>(kept * micro_batches) * sizing->block.graph_bytes);
  }
  // Layer-major: the other micro-batches' last hidden states wait for the head through forward,
  // and their gradients for the next block through backward.
  if (layer_major) {
    add(sizing, Tier::kGpu, "other micro-batches' hidden states",
        2 * static_cast<std::uint64_t>(micro_batches - 1) * sizing->block.checkpoint_bytes);
  }
  // Backward needs one block's graph on the device (recomputed) with the gradients of its
  // intermediates; the head and loss peak before that.
  const std::uint64_t block_backward =
      (rebuilt_on_gpu ? sizing->block.graph_bytes : 0) + sizing->block.backward_working_bytes;
  add(sizing, Tier::kGpu, "working activations", std::max(sizing->head.peak_bytes, block_backward));
}

}  // namespace

bool is_activation(const std::string& role) {
  for (const char* prefix : {"graphs", "working activations", "other micro-batches' hidden states", "hidden states",
                             "allocator headroom"}) {
    if (role.rfind(prefix, 0) == 0) return true;
  }
  return false;
}

std::uint64_t compute_element_size(Precision precision) { return precision == Precision::kF32 ? 4 : 2; }

std::vector<BlockActivations> engine_activations(const PlanRequest& request) {
  if (request.engine.mode == Mode::kZo2) return {};
  return block_activations(request.engine, request.model.num_layers);
}

std::uint64_t block_parameter_bytes(const PlanRequest& request) {
  return round_up(static_cast<std::uint64_t>(request.model.block_parameter_count()) *
                  compute_element_size(request.engine.precision));
}

std::uint64_t tier_limit(const PlanRequest& request, Tier tier) {
  const EngineConfig& config = request.engine;
  switch (tier) {
    case Tier::kGpu:
      return config.gpu_budget_bytes ? config.gpu_budget_bytes : request.hardware.gpu_memory_bytes;
    case Tier::kHost:
      // The ranks of a data-parallel job share one host's memory (one host: `--gpus N` is torchrun's
      // --nproc-per-node).
      return config.host_budget_bytes ? config.host_budget_bytes
                                      : request.hardware.host_memory_bytes / static_cast<std::uint64_t>(request.world_size);
    case Tier::kNvme:
      return config.nvme_budget_bytes;
  }
  return 0;
}

Sizing size_tiers(const PlanRequest& request, const EngineConfig& config) {
  const models::ModelConfig& model = request.model;
  model.validate();
  FERRY_CHECK(request.batch >= 1, "batch = ", request.batch, " is invalid: it must be at least 1");
  FERRY_CHECK(request.seq >= 1, "seq = ", request.seq, " is invalid: it must be at least 1");
  FERRY_CHECK(model.family == models::Family::kLlama || request.seq <= model.max_position_embeddings,
              "seq = ", request.seq, " is longer than the model's ", model.max_position_embeddings,
              " learned positions: use --seq ", model.max_position_embeddings, " or less");
  const bool zo2 = config.mode == Mode::kZo2;
  FERRY_CHECK(config.placement.activations.size() == (zo2 ? 0 : static_cast<std::size_t>(model.num_layers)),
              "a placement needs one entry per block: got ", config.placement.activations.size(), " for ",
              model.num_layers, " blocks");
  Sizing sizing;
  sizing.config = config;
  if (zo2) sizing.config.zo.gpu_blocks = zo_gpu_blocks(part_shapes(model), config);  // resolves auto
  ActivationShape shape{request.batch, request.seq, compute_element_size(config.precision),
                        request.attention == AttentionKernel::kFused};
  sizing.block = block_costs(model, shape);
  sizing.head = head_costs(model, shape);
  if (!zo2) sizing.placement = resolve_placement(config, static_cast<std::size_t>(model.num_layers) + 2);
  const TierDemand demand = rank_demand(part_shapes(model), config, zo2 ? 0 : sizing.block.checkpoint_bytes,
                                        Ranks{0, request.world_size});
  for (Tier tier : {Tier::kGpu, Tier::kHost, Tier::kNvme}) {
    for (const TierDemand::Item& item : demand.items[static_cast<int>(tier)]) {
      add(&sizing, tier, item.role, item.bytes);
    }
  }
  if (zo2) {
    // Forward only: the hidden states of the + and - forwards, one block's intermediates, and
    // the logits and loss of one forward at a time.
    add(&sizing, Tier::kGpu, "hidden states (+ and -)", 2 * sizing.block.checkpoint_bytes);
    add(&sizing, Tier::kGpu, "working activations",
        std::max(sizing.block.forward_working_bytes, sizing.head.forward_logits_bytes));
    add_headroom(&sizing, request.hardware);
    return sizing;
  }
  add_activations(&sizing);
  add_headroom(&sizing, request.hardware);
  return sizing;
}

}  // namespace ferry::detail
