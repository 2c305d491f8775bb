// make_plan: sizes the tiers, replays the step, chooses fuyou's activation placement, and when the
// budgets do not hold, tries the nearby requests that would.

#include <algorithm>
#include <cmath>
#include <functional>
#include <optional>

#include "ferry/check.h"
#include "ferry/memory.h"
#include "plan/plan_impl.h"

namespace ferry {
namespace {

using detail::Sizing;
using detail::StepPrediction;

struct Candidate {
  Sizing sizing;
  StepPrediction step;
  bool fits = true;
};

bool fits(const PlanRequest& request, const Sizing& sizing) {
  for (Tier tier : {Tier::kGpu, Tier::kHost, Tier::kNvme}) {
    const std::uint64_t limit = detail::tier_limit(request, tier);
    if (limit > 0 && sizing.tier_bytes[static_cast<int>(tier)] > limit) return false;
  }
  return true;
}

Candidate evaluate(const PlanRequest& request, const std::vector<BlockActivations>& activations) {
  Candidate candidate;
  candidate.sizing = detail::size_tiers(request, activations);
  candidate.step = detail::predict_step(request, candidate.sizing);
  candidate.fits = fits(request, candidate.sizing);
  return candidate;
}

std::uint64_t bytes_on(const Sizing& sizing, Tier tier, const std::string& role_prefix) {
  std::uint64_t sum = 0;
  for (const PlanItem& item : sizing.items) {
    if (item.tier == tier && item.role.rfind(role_prefix, 0) == 0) sum += item.bytes;
  }
  return sum;
}

// Note: fuyou's activation placement. Blocks are alike, so a placement is described by how many
// keep their graph (the last `graphs` blocks: backward needs them first) and where each block's
// activations live: from the last block back, on the GPU while it has room, then in host memory
// (or not, leaving the host to the parameter cache), then on NVMe. Every count is tried and the
// fastest placement that fits wins; ties go to fewer graphs.
std::vector<BlockActivations> fuyou_placement(const PlanRequest& request, std::int64_t graphs,
                                              bool activations_on_host, const Sizing& all_on_nvme) {
  const std::int64_t blocks = request.model.num_layers;
  auto room = [&](Tier tier) -> std::uint64_t {
    const std::uint64_t limit = detail::tier_limit(request, tier);
    std::uint64_t used = all_on_nvme.tier_bytes[static_cast<int>(tier)];
    if (tier == Tier::kHost) used -= bytes_on(all_on_nvme, Tier::kHost, "parameter cache");
    return limit > used ? limit - used : 0;
  };
  std::uint64_t gpu_room = room(Tier::kGpu), host_room = activations_on_host ? room(Tier::kHost) : 0;
  std::vector<BlockActivations> placement(static_cast<std::size_t>(blocks));
  for (std::int64_t i = blocks; i-- > 0;) {
    BlockActivations& block = placement[static_cast<std::size_t>(i)];
    block.recompute = i < blocks - graphs;
    const std::uint64_t bytes =
        block.recompute ? all_on_nvme.block.checkpoint_bytes : all_on_nvme.block.graph_bytes;
    if (bytes <= gpu_room) {
      block.tier = Tier::kGpu;
      gpu_room -= bytes;
    } else if (bytes <= host_room) {
      block.tier = Tier::kHost;
      host_room -= bytes;
    } else {
      block.tier = Tier::kNvme;
    }
  }
  return placement;
}

Candidate choose_fuyou_activations(const PlanRequest& request) {
  const std::int64_t blocks = request.model.num_layers;
  const Sizing all_on_nvme = detail::size_tiers(
      request, std::vector<BlockActivations>(static_cast<std::size_t>(blocks), {true, Tier::kNvme}));
  std::optional<Candidate> best;
  for (std::int64_t graphs = 0; graphs <= blocks; ++graphs) {
    for (bool on_host : {true, false}) {
      Candidate candidate = evaluate(request, fuyou_placement(request, graphs, on_host, all_on_nvme));
      const bool better =
          !best || (candidate.fits && !best->fits) ||
          (candidate.fits == best->fits && candidate.step.step_seconds < best->step.step_seconds * (1 - 1e-9));
      if (better) best = std::move(candidate);
    }
  }
  return *best;
}

Candidate plan_candidate(const PlanRequest& request) {
  if (request.mode == PlanMode::kFuyou && request.choose_activations) {
    return choose_fuyou_activations(request);
  }
  return evaluate(request, detail::engine_activations(request));
}

void check_hardware(const PlanRequest& request) {
  const Hardware& hw = request.hardware;
  const EngineConfig& config = request.engine;
  auto need = [&](double figure, const char* what, const char* flag) {
    FERRY_CHECK(figure > 0 && std::isfinite(figure), "the hardware figures ('", hw.name, "') have no ", what,
                ": measure this machine with `ferry bench calibrate`, pass --calibration FILE, or give --",
                flag);
  };
  need(hw.matmul_tflops(config.precision),
       (std::string(to_string(config.precision)) + " matmul TFLOPS").c_str(),
       (std::string("tflops-") + to_string(config.precision)).c_str());
  need(hw.gpu_memory_gbps, "GPU memory bandwidth", "gpu-memory-gbps");
  if (request.mode != PlanMode::kGpu) {
    need(hw.pcie_h2d_gbps, "PCIe host-to-device bandwidth", "pcie-h2d-gbps");
    need(hw.pcie_d2h_gbps, "PCIe device-to-host bandwidth", "pcie-d2h-gbps");
  }
  if (request.mode == PlanMode::kZeroOffload || request.mode == PlanMode::kFuyou) {
    need(hw.cpu_adam_params_per_s, "CPU optimizer throughput", "cpu-adam-params-per-s");
  }
  const bool uses_nvme = request.mode == PlanMode::kFuyou ||
                         (request.mode == PlanMode::kZo2 && config.zo.block_tier == Tier::kNvme);
  if (uses_nvme) {
    FERRY_CHECK(!config.nvme_directories.empty(), to_string(request.mode),
                " mode keeps state on NVMe: pass --nvme DIR[,DIR...]");
    need(hw.nvme_read_gbps(config.nvme_directories), "NVMe read bandwidth", "nvme-read-gbps");
    need(hw.nvme_write_gbps(config.nvme_directories), "NVMe write bandwidth", "nvme-write-gbps");
  }
}

std::optional<Candidate> try_plan(const PlanRequest& request) {
  try {
    check_hardware(request);
    return plan_candidate(request);
  } catch (const Error&) {
    return std::nullopt;
  }
}

std::string describe_time(const Candidate& candidate) {
  char text[64];
  std::snprintf(text, sizeof text, " (predicted %.3g s/step)", candidate.step.step_seconds);
  return text;
}

// The largest value in [low, high] for which `works` holds, assuming it holds up to a point.
std::optional<std::int64_t> largest_that_works(std::int64_t low, std::int64_t high,
                                               const std::function<bool(std::int64_t)>& works) {
  if (low > high || !works(low)) return std::nullopt;
  while (low < high) {
    const std::int64_t middle = low + (high - low + 1) / 2;
    if (works(middle)) {
      low = middle;
    } else {
      high = middle - 1;
    }
  }
  return low;
}

// Note: the fixes, smallest first: what the budgets would have to be; the engine's activation
// knobs; a smaller micro-batch (with accumulation keeping the tokens per step); another mode.
std::vector<std::string> find_fixes(const PlanRequest& request, const Candidate& failed) {
  std::vector<std::string> fixes;
  const char* flags[kTierCount] = {"--gpu-budget", "--host-budget", "--nvme-budget"};
  for (Tier tier : {Tier::kGpu, Tier::kHost, Tier::kNvme}) {
    const std::uint64_t needed = failed.sizing.tier_bytes[static_cast<int>(tier)];
    const std::uint64_t limit = detail::tier_limit(request, tier);
    if (limit == 0 || needed <= limit) continue;
    const std::uint64_t physical = tier == Tier::kGpu    ? request.hardware.gpu_memory_bytes
                                   : tier == Tier::kHost ? request.hardware.host_memory_bytes
                                                         : 0;
    if (physical > 0 && needed > physical) continue;
    fixes.push_back(detail::concat("raise ", flags[static_cast<int>(tier)], " to ", format_bytes(needed)));
  }
  auto fitting = [&](const PlanRequest& changed) -> std::optional<Candidate> {
    std::optional<Candidate> candidate = try_plan(changed);
    if (candidate && candidate->fits) return candidate;
    return std::nullopt;
  };
  const bool first_order_engine = request.mode == PlanMode::kGpu || request.mode == PlanMode::kZeroOffload;
  if (first_order_engine && request.engine.keep_graph_blocks > 0) {
    auto keep = largest_that_works(0, std::min(request.engine.keep_graph_blocks, request.model.num_layers) - 1,
                                   [&](std::int64_t k) {
                                     PlanRequest changed = request;
                                     changed.engine.keep_graph_blocks = k;
                                     return fitting(changed).has_value();
                                   });
    if (keep) fixes.push_back(detail::concat("keep fewer graphs: --keep-graph ", *keep));
  }
  if (first_order_engine && !request.engine.offload_checkpoints) {
    PlanRequest changed = request;
    changed.engine.offload_checkpoints = true;
    changed.engine.keep_graph_blocks = 0;
    if (auto candidate = fitting(changed)) {
      fixes.push_back("offload the checkpoints to the host: --offload-checkpoints --keep-graph 0" +
                      describe_time(*candidate));
    }
  }
  if (request.mode != PlanMode::kZo2 && request.batch > 1) {
    auto batch = largest_that_works(1, request.batch - 1, [&](std::int64_t b) {
      PlanRequest changed = request;
      changed.batch = b;
      return fitting(changed).has_value();
    });
    if (batch) {
      const std::int64_t accumulation = (request.batch * request.engine.grad_accumulation + *batch - 1) / *batch;
      fixes.push_back(detail::concat("reduce the micro-batch: --batch ", *batch, " --grad-accum ",
                                     accumulation, " (about the same tokens per step)"));
    }
  }
  for (PlanMode mode : {PlanMode::kZeroOffload, PlanMode::kFuyou, PlanMode::kZo2}) {
    if (mode == request.mode) continue;
    PlanRequest changed = request;
    changed.mode = mode;
    if (auto candidate = fitting(changed)) {
      fixes.push_back(detail::concat("switch mode: --mode ", to_string(mode), describe_time(*candidate)));
    } else if (mode == PlanMode::kFuyou && request.engine.nvme_directories.empty()) {
      fixes.push_back("fuyou mode keeps parameters and optimizer states on NVMe: try --mode fuyou "
                      "--nvme DIR[,DIR...]");
    }
  }
  if (fixes.empty()) {
    fixes.push_back("none found: the model does not fit this hardware in any mode at batch 1; "
                    "add NVMe directories or memory");
  }
  return fixes;
}

}  // namespace

Plan make_plan(const PlanRequest& request) {
  check_hardware(request);
  Candidate chosen = plan_candidate(request);
  Plan plan;
  plan.request = request;
  plan.items = chosen.sizing.items;
  plan.activations = chosen.sizing.activations;
  plan.cached_blocks = chosen.sizing.cached_blocks;
  plan.checkpoint_bytes = chosen.sizing.block.checkpoint_bytes;
  plan.graph_bytes = chosen.sizing.block.graph_bytes;
  plan.fits = chosen.fits;
  for (Tier tier : {Tier::kGpu, Tier::kHost, Tier::kNvme}) {
    const int t = static_cast<int>(tier);
    plan.tier_bytes[t] = chosen.sizing.tier_bytes[t];
    plan.tier_budget[t] = detail::tier_limit(request, tier);
    if (plan.tier_budget[t] > 0 && plan.tier_bytes[t] > plan.tier_budget[t]) {
      plan.shortfalls.push_back(detail::concat(
          to_string(tier), " tier: needs ", format_bytes(plan.tier_bytes[t]), ", the limit is ",
          format_bytes(plan.tier_budget[t]), ": ", format_bytes(plan.tier_bytes[t] - plan.tier_budget[t]),
          " short"));
    }
  }
  if (!plan.fits) plan.fixes = find_fixes(request, chosen);

  const StepPrediction& step = chosen.step;
  const double tokens = static_cast<double>(request.batch * request.seq * request.engine.grad_accumulation);
  const double parameters = static_cast<double>(request.model.parameter_count());
  const double useful_flops = request.mode == PlanMode::kZo2
                                  ? 4.0 * parameters * tokens * static_cast<double>(request.engine.zo.samples)
                                  : 6.0 * parameters * tokens;
  plan.step_seconds = step.step_seconds;
  plan.tokens_per_s = tokens / step.step_seconds;
  plan.model_tflops = useful_flops / step.step_seconds / 1e12;
  plan.hardware_tflops = step.executed_flops / step.step_seconds / 1e12;
  // Shared NVMe is one resource for the bottleneck, named after the direction that uses it more.
  auto load = [&](Resource resource) {
    const int r = static_cast<int>(resource);
    const bool nvme = resource == Resource::kNvmeRead || resource == Resource::kNvmeWrite;
    if (!nvme || !request.hardware.nvme_shared) return step.busy_seconds[r];
    return step.busy_seconds[static_cast<int>(Resource::kNvmeRead)] +
           step.busy_seconds[static_cast<int>(Resource::kNvmeWrite)];
  };
  for (int r = 0; r < kResourceCount; ++r) {
    plan.busy_seconds[r] = step.busy_seconds[r];
    plan.moved_bytes[r] = step.moved_bytes[r];
    const Resource resource = static_cast<Resource>(r);
    if (load(resource) > load(plan.bottleneck) ||
        (load(resource) == load(plan.bottleneck) && step.busy_seconds[r] > plan.busy_seconds[static_cast<int>(plan.bottleneck)])) {
      plan.bottleneck = resource;
    }
  }
  plan.spans = step.spans;
  return plan;
}

}  // namespace ferry
