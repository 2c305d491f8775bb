// The engine's sizing (ferry::engine_demand): the bytes each mode keeps on each tier, computed
// from part sizes alone so that a model can be sized without being built.

#include <algorithm>
#include <cmath>

#include "engine/sizing.h"

#include "engine/data_parallel.h"
#include "engine/layout.h"
#include "engine/update.h"
#include "ferry/check.h"
#include "ferry/memory.h"
#include "ferry/zo.h"

namespace ferry {
namespace {

std::string describe_gpu_blocks(const ZoConfig& zo) {
  return zo.gpu_blocks == ZoConfig::kAutoGpuBlocks ? "auto" : std::to_string(zo.gpu_blocks);
}

void validate_zo(const EngineConfig& config) {
  const ZoConfig& zo = config.zo;
  FERRY_CHECK(zo.eps > 0 && std::isfinite(zo.eps), "zo eps = ", zo.eps,
              " is invalid: it must be a positive perturbation scale (MeZO uses 1e-3)");
  FERRY_CHECK(zo.samples >= 1 && zo.samples <= optim::kMaxZoSamples, "zo samples = ", zo.samples,
              " is invalid: use 1 to ", optim::kMaxZoSamples);

  FERRY_CHECK(zo.gpu_blocks >= 0 || zo.gpu_blocks == ZoConfig::kAutoGpuBlocks, "zo gpu_blocks = ",
              zo.gpu_blocks, " is invalid: use a number of blocks >= 0, or auto");
  FERRY_CHECK(zo.block_tier != Tier::kGpu || zo.gpu_blocks == 0, "zo gpu_blocks = ",
              describe_gpu_blocks(zo), " only applies with block tier host or nvme: tier gpu keeps "
              "every block resident");
  FERRY_CHECK(zo.gpu_blocks != ZoConfig::kAutoGpuBlocks || config.gpu_budget_bytes > 0,
              "zo gpu_blocks = auto needs a gpu budget to fill: set --gpu-budget, or give a number "
              "of blocks");
  FERRY_CHECK(zo.host_blocks >= 0, "zo host_blocks = ", zo.host_blocks, " is invalid: it must be >= 0");
  FERRY_CHECK(zo.block_tier == Tier::kNvme || zo.host_blocks == 0,
              "zo host_blocks = ", zo.host_blocks, " only applies with block tier nvme");
  FERRY_CHECK(zo.block_tier != Tier::kNvme || !config.nvme_directories.empty(),
              "zo block tier nvme needs at least one NVMe directory (--nvme DIR[,DIR...])");
  FERRY_CHECK(zo.blocks_in_flight >= 2, "zo blocks_in_flight = ", zo.blocks_in_flight,
              " is invalid: it must be at least 2 (one computing, one uploading)");
  FERRY_CHECK(zo.write_back_interval >= 1 && zo.write_back_interval <= optim::kMaxZoUpdates,
              "zo write_back_interval = ", zo.write_back_interval, " is invalid: use 1 to ",
              optim::kMaxZoUpdates);
  if (zo.transfer != ZoTransfer::kStorage) {
    const char* transfer = to_string(zo.transfer);
    FERRY_CHECK(zo.block_tier == Tier::kHost, "zo transfer ", transfer, " needs the blocks in host memory "
                "(block tier host), where the CPU updates their stored weights; the block tier is ",
                to_string(zo.block_tier), ". Use transfer storage with tier ", to_string(zo.block_tier));
    const Precision storage = detail::zo_storage(config);
    FERRY_CHECK(zo.transfer != ZoTransfer::kBF16 || storage == Precision::kF32, "zo transfer bf16 "
                "compresses an fp32 master; the storage is ", to_string(storage),
                ": use storage fp32, or transfer storage");
    FERRY_CHECK(zo.transfer != ZoTransfer::kFp8 || storage != Precision::kF16, "zo transfer fp8 needs "
                "storage fp32 or bf16; the storage is fp16");
  }
  FERRY_CHECK(config.optimizer.kind != OptimizerKind::kAdagrad,
              "zo2 mode supports the optimizers sgd (with or without momentum), adam and adamw; "
              "got adagrad");
  FERRY_CHECK(config.grad_accumulation == 1, "grad_accumulation = ", config.grad_accumulation,
              " is invalid in zo2 mode: it has no gradients to accumulate; use zo samples for more "
              "perturbations per step");
  FERRY_CHECK(config.max_grad_norm == 0, "max_grad_norm = ", config.max_grad_norm,
              " is invalid in zo2 mode: it has no gradient to clip; use 0");
  FERRY_CHECK(config.precision != Precision::kF16 || config.loss_scale.enabled != true,
              "loss scaling is invalid in zo2 mode: there is no backward pass to scale");
}

void validate_activations(const EngineConfig& config) {
  auto needs_nvme = [&](Tier tier) { return tier == Tier::kNvme && config.nvme_directories.empty(); };
  for (std::size_t i = 0; i < config.placement.activations.size(); ++i) {
    const BlockActivations& block = config.placement.activations[i];
    FERRY_CHECK(block.recompute || block.tier == Tier::kGpu, "block ", i, " activations '",
                block.describe(), "' are invalid: a kept autograd graph stays on the gpu; swap its "
                "checkpoint instead (host or nvme)");
    FERRY_CHECK(!needs_nvme(block.tier), "block ", i,
                " activations on nvme need at least one NVMe directory (--nvme DIR[,DIR...])");
    FERRY_CHECK(config.mode != Mode::kFuyou || block.recompute, "block ", i,
                " activations 'graph' are invalid in fuyou mode: a kept graph would hold the "
                "block's streamed parameters on the device until its backward; use gpu, host or "
                "nvme for its checkpoint");
  }
}

void validate_fuyou(const EngineConfig& config) {
  FERRY_CHECK(!config.nvme_directories.empty(),
              "fuyou mode keeps parameters, gradients and optimizer states on NVMe: pass "
              "--nvme DIR[,DIR...]");
  FERRY_CHECK(config.fuyou.host_blocks >= 0, "fuyou host_blocks = ", config.fuyou.host_blocks,
              " is invalid: it must be >= 0");
  FERRY_CHECK(config.fuyou.blocks_in_flight >= 2, "fuyou blocks_in_flight = ",
              config.fuyou.blocks_in_flight,
              " is invalid: it must be at least 2 (one computing, one uploading)");
  FERRY_CHECK(config.keep_graph_blocks == 0, "keep_graph_blocks = ", config.keep_graph_blocks,
              " is invalid in fuyou mode: every block is recomputed from its checkpoint (a kept "
              "graph would hold the block's streamed parameters on the device); use 0");
}

void validate_delayed_update(const EngineConfig& config) {
  const DelayedUpdateConfig& delayed = config.delayed_update;
  FERRY_CHECK(delayed.warmup_steps >= 0, "delayed_update warmup_steps = ", delayed.warmup_steps,
              " is invalid: it must be >= 0");
  if (!delayed.enabled) return;
  const char* why = "";
  switch (config.mode) {
    case Mode::kZeroOffload: return;
    case Mode::kAuto: {
      const std::vector<PartPlacement>& parts = config.placement.parts;
      const bool streams = std::any_of(parts.begin(), parts.end(), [](const PartPlacement& p) { return p.streamed(); });
      const bool cpu = std::any_of(parts.begin(), parts.end(), [](const PartPlacement& p) { return !p.updated_on_gpu(); });
      if (!streams && cpu) return;
      why = streams ? "each streamed block is updated in backward while its parameters are staged on the host"
                    : "every part is updated on the device, so there is no CPU update to hide";
      break;
    }
    case Mode::kGpu: why = "the optimizer runs on the device, so there is no CPU update to hide"; break;
    case Mode::kFuyou:
      why = "each block is updated in backward while its parameters are staged on the host";
      break;
    case Mode::kZo2: why = "it already applies each update when the parts next come to the device"; break;
  }
  throw Error(detail::concat("delayed_update is for zero-offload mode only (or an auto placement whose parameters "
                             "all stay on the device); ", to_string(config.mode), " mode cannot delay its update: ", why));
}

}  // namespace

namespace detail {

void validate(const EngineConfig& config) {
  FERRY_CHECK(config.grad_accumulation >= 1, "grad_accumulation = ", config.grad_accumulation,
              " is invalid: it must be at least 1");
  FERRY_CHECK(config.max_grad_norm >= 0 && std::isfinite(config.max_grad_norm),
              "max_grad_norm = ", config.max_grad_norm, " is invalid: use 0 (off) or a positive norm");
  FERRY_CHECK(config.gpu_working_bytes == 0 || config.gpu_working_bytes < config.gpu_budget_bytes,
              "gpu_working = ", format_bytes(config.gpu_working_bytes), " is invalid: it is the part of the gpu budget (",
              format_bytes(config.gpu_budget_bytes), ") left for activations, so it needs a budget larger than itself");
  FERRY_CHECK(config.keep_graph_blocks >= 0, "keep_graph_blocks = ", config.keep_graph_blocks,
              " is invalid: it must be >= 0");
  FERRY_CHECK(config.schedule.warmup_steps >= 0, "warmup_steps = ", config.schedule.warmup_steps,
              " is invalid: it must be >= 0");
  FERRY_CHECK(config.schedule.kind == LrSchedule::kConstant || config.schedule.total_steps > 0,
              "the ", to_string(config.schedule.kind),
              " schedule needs total_steps > 0; got ", config.schedule.total_steps);
  FERRY_CHECK(config.schedule.min_lr_ratio >= 0 && config.schedule.min_lr_ratio <= 1,
              "min_lr_ratio = ", config.schedule.min_lr_ratio, " is invalid: use 0 to 1");
  FERRY_CHECK(config.device.is_cpu() || config.device.is_cuda(), "device ", config.device,
              " is not supported: use cpu or cuda");
  validate(config.optimizer);
  FERRY_CHECK(config.micro_batch_order == MicroBatchOrder::kBatchMajor || config.grad_accumulation > 1,
              "micro_batch_order layer-major needs grad_accumulation > 1 (it orders a step's "
              "micro-batches); got grad_accumulation = ", config.grad_accumulation);
  FERRY_CHECK(config.micro_batch_order == MicroBatchOrder::kBatchMajor || config.mode != Mode::kZo2,
              "micro_batch_order layer-major is for the first-order modes; zo2 has no micro-batches");
  FERRY_CHECK(config.staged.empty() || world_size(config) == 1, "staged layout '", config.staged,
              "' is one process's live state; with ", world_size(config), " ranks each would write "
              "into it: train from the model's weights, or with one rank");
  FERRY_CHECK(config.staged.empty() || unstageable(config.mode).empty(), "staged layout '",
              config.staged, "' was given, but ", unstageable(config.mode));
  if (config.mode == Mode::kZo2) validate_zo(config);
  if (config.mode == Mode::kFuyou) validate_fuyou(config);
  validate_delayed_update(config);
  validate_activations(config);
}

std::string unstageable(Mode mode) {
  switch (mode) {
    case Mode::kFuyou: return "";
    case Mode::kGpu:
    case Mode::kZeroOffload:
      return concat(to_string(mode), " mode keeps nothing on NVMe, so there is no layout to stage "
                    "or adopt: load the checkpoint directly (--model), or use --mode fuyou");
    case Mode::kAuto:
      return "an auto placement cannot start from a staged layout yet (staging lays out fuyou's bundles): "
             "load the checkpoint directly (--model), or use --mode fuyou";
    case Mode::kZo2:
      return "zo2 mode cannot start from a staged layout yet (it lays out its own bundles): load "
             "the checkpoint directly (--model), or use --mode fuyou";
  }
  return "unknown mode";
}

// Note: the window uploads at most blocks_in_flight blocks ahead of the forwards. Resident blocks
// bunched at the start leave PCIe idle once the window is full and they are still computing;
// spread out, each one's forwards let the uploads catch up while every slot keeps a block coming.
// Block 0 is resident, so a step's compute starts without waiting for an upload. Block b is
// resident when [b * n, (b + 1) * n) holds a multiple of `blocks`: these intervals tile
// [0, blocks * n), so exactly n blocks are, and ceil(b * n / blocks) of them come before b.
Tier zo_block_home(const ZoConfig& zo, std::int64_t block, std::int64_t blocks) {
  FERRY_ASSERT(zo.gpu_blocks >= 0, "zo gpu_blocks must be resolved (zo_gpu_blocks) before placing blocks");
  FERRY_ASSERT(block >= 0 && block < blocks && zo.gpu_blocks <= blocks, "block ", block, " of ", blocks,
               " with ", zo.gpu_blocks, " resident");
  const std::int64_t resident = zo.gpu_blocks;
  if (block * resident % blocks < resident) return Tier::kGpu;
  const std::int64_t streamed_before = block - (block * resident + blocks - 1) / blocks;
  const bool on_host = zo.block_tier == Tier::kNvme && streamed_before < zo.host_blocks;
  return on_host ? Tier::kHost : zo.block_tier;
}

Precision zo_storage(const EngineConfig& config) {
  return config.zo.storage.value_or(config.precision);
}

bool zo_compressed(const ZoConfig& zo, std::int64_t block, std::int64_t blocks) {
  return zo.transfer != ZoTransfer::kStorage && zo_block_home(zo, block, blocks) == Tier::kHost;
}

std::uint64_t zo_transfer_bytes(ZoTransfer transfer, std::int64_t numel) {
  const auto count = static_cast<std::uint64_t>(numel);
  switch (transfer) {
    case ZoTransfer::kStorage: return 0;
    case ZoTransfer::kBF16: return 2 * count;
    case ZoTransfer::kFp8: return kZoTransferTableBytes + count;
  }
  return 0;
}

std::uint64_t store_gpu_budget(const EngineConfig& config) {
  return config.gpu_budget_bytes == 0 ? 0 : config.gpu_budget_bytes - config.gpu_working_bytes;
}

void check_budgets(const TierDemand& needed, const EngineConfig& config) {
  for (Tier tier : {Tier::kGpu, Tier::kHost, Tier::kNvme}) {
    const std::uint64_t budget = tier == Tier::kGpu    ? store_gpu_budget(config)
                                 : tier == Tier::kHost ? config.host_budget_bytes
                                                       : config.nvme_budget_bytes;
    const std::uint64_t bytes = needed.bytes[static_cast<int>(tier)];
    if (budget == 0 || bytes <= budget) continue;
    throw BudgetExceeded(detail::concat(
        to_string(config.mode), " mode needs ", format_bytes(bytes), " on the ", to_string(tier),
        " tier (", needed.describe(tier), ") but the ", to_string(tier),
        " budget is ", format_bytes(budget), ": ", format_bytes(bytes - budget),
        " short. Raise --", to_string(tier), "-budget to at least ", format_bytes(bytes),
        tier == Tier::kGpu && config.mode == Mode::kGpu ? ", or use --mode zero-offload (or auto)" : "",
        " (activations come on top of this)"));
  }
}

StoreOptions store_options(const EngineConfig& config) {
  StoreOptions options;
  options.device = config.device;
  options.gpu_budget_bytes = config.gpu_budget_bytes ? store_gpu_budget(config) : UINT64_MAX;
  options.host_budget_bytes = config.host_budget_bytes ? config.host_budget_bytes : UINT64_MAX;
  options.nvme_budget_bytes = config.nvme_budget_bytes ? config.nvme_budget_bytes : UINT64_MAX;
  options.nvme_directories = config.nvme_directories;
  // Ranks on one host may share the directories.
  options.nvme_file_name = rank_file_name(config, options.nvme_file_name);
  options.env = config.nvme_env;
  if (config.nvme_queue_depth > 0) options.io.queue_depth = config.nvme_queue_depth;
  if (config.nvme_block_bytes > 0) options.io.block_bytes = static_cast<std::size_t>(config.nvme_block_bytes);
  // A copy may wait for earlier ones to finish their transfers and be evicted.
  options.budget_wait_seconds = 60;
  return options;
}

}  // namespace detail

std::string TierDemand::describe(Tier tier) const {
  std::string text;
  for (const Item& item : items[static_cast<int>(tier)]) {
    text += (text.empty() ? "" : ", ") + item.role + " " + format_bytes(item.bytes);
  }
  return text;
}

std::vector<PartShape> part_shapes(const models::ModelConfig& config) {
  // With LoRA the base is frozen and the blocks' adapters alone are trained.
  auto shape = [&](std::string name, std::int64_t base, std::int64_t adapters, std::int64_t channels) {
    return config.lora.enabled() ? PartShape{std::move(name), adapters, base, channels}
                                 : PartShape{std::move(name), base, 0, 0};
  };
  std::vector<PartShape> parts;
  // An fp8 base keeps a scale per output channel: a matrix's rows, a vector's elements.
  std::int64_t block_channels = 0;
  for (const models::ParameterSpec& spec : config.block_parameters()) {
    block_channels += spec.shape.size() >= 2 ? spec.shape[0] : spec.numel();
  }
  parts.push_back(shape("stem", config.stem_parameter_count(), 0, 0));
  for (std::int64_t i = 0; i < config.num_layers; ++i) {
    parts.push_back(shape("block." + std::to_string(i), config.block_parameter_count(), config.lora_parameter_count(),
                          block_channels));
  }
  parts.push_back(shape("head", config.head_parameter_count(), 0, 0));
  return parts;
}

TierDemand engine_demand(const std::vector<PartShape>& parts, const EngineConfig& config,
                         std::uint64_t checkpoint_bytes) {
  return detail::rank_demand(parts, config, checkpoint_bytes, detail::ranks_of(config));
}

TierDemand detail::rank_demand(const std::vector<PartShape>& parts, const EngineConfig& config,
                               std::uint64_t checkpoint_bytes, const Ranks& ranks) {
  detail::validate(config);
  FERRY_CHECK(parts.size() >= 2, "a model needs a stem and a head; got ", parts.size(), " parts");
  if (config.mode == Mode::kZo2) {
    EngineConfig resolved = config;
    resolved.zo.gpu_blocks = zo_gpu_blocks(parts, config);
    return detail::count_zo(parts, resolved);
  }
  return detail::count_first_order(parts, config, checkpoint_bytes, ranks);
}

std::int64_t zo_gpu_blocks(const std::vector<PartShape>& parts, const EngineConfig& config) {
  FERRY_CHECK(config.mode == Mode::kZo2, "zo gpu_blocks applies to mode zo2; the mode is ",
              to_string(config.mode));
  detail::validate(config);
  const auto blocks = static_cast<std::int64_t>(parts.size()) - 2;
  if (config.zo.gpu_blocks != ZoConfig::kAutoGpuBlocks) {
    FERRY_CHECK(config.zo.gpu_blocks <= blocks, "zo gpu_blocks = ", config.zo.gpu_blocks,
                " is more than the model's ", blocks, " blocks: use 0 to ", blocks, ", or auto");
    return config.zo.gpu_blocks;
  }
  // Note: not monotone at the top: with every block resident nothing is in flight, so all
  // blocks may fit where all but one do not. Hence the search from the top.
  EngineConfig trial = config;
  for (std::int64_t n = blocks; n > 0; --n) {
    trial.zo.gpu_blocks = n;
    if (detail::count_zo(parts, trial).bytes[static_cast<int>(Tier::kGpu)] <= detail::store_gpu_budget(config)) return n;
  }
  return 0;
}

}  // namespace ferry
