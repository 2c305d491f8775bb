// make_plan: sizes the tiers, replays the step, chooses fuyou's checkpoint tiers and host blocks
// and, when asked, the micro-batch; when the budgets do not hold, tries the nearby requests that
// would.

#include <algorithm>
#include <cmath>
#include <cstdio>
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

Candidate evaluate(const PlanRequest& request, const EngineConfig& config) {
  Candidate candidate;
  candidate.sizing = detail::size_tiers(request, config);
  candidate.step = detail::predict_step(request, candidate.sizing);
  candidate.fits = fits(request, candidate.sizing);
  return candidate;
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

// Whether `candidate` beats `best`: it fits where `best` does not, or it is faster by more than
// `tolerance` (a fraction of the step).
bool better(const Candidate& candidate, const Candidate& best, double tolerance) {
  if (candidate.fits != best.fits) return candidate.fits;
  return candidate.step.step_seconds < best.step.step_seconds * (1 - tolerance);
}

// What the tier's limit leaves; unlimited without one.
std::uint64_t room(const PlanRequest& request, const Sizing& sizing, Tier tier) {
  const std::uint64_t limit = detail::tier_limit(request, tier);
  const std::uint64_t used = sizing.tier_bytes[static_cast<int>(tier)];
  if (limit == 0) return UINT64_MAX;
  return limit > used ? limit - used : 0;
}

// fuyou: the host blocks take what the host budget leaves, a whole block at a time.
EngineConfig with_host_blocks(const PlanRequest& request, EngineConfig config) {
  if (config.mode != Mode::kFuyou || !request.choose_host_blocks) return config;
  config.fuyou.host_blocks = 0;
  const std::uint64_t left = room(request, detail::size_tiers(request, config), Tier::kHost);
  config.fuyou.host_blocks = static_cast<std::int64_t>(std::min<std::uint64_t>(
      static_cast<std::uint64_t>(request.model.num_layers), left / detail::block_parameter_bytes(request)));
  return config;
}

// Every block recomputes from its checkpoint: from the last block back (backward needs the last
// ones first), `on_gpu` checkpoints on the device, then `on_host` in host memory, the rest on NVMe.
EngineConfig fuyou_placement(const PlanRequest& request, std::int64_t on_gpu, std::int64_t on_host) {
  const std::int64_t blocks = request.model.num_layers;
  EngineConfig config = request.engine;
  config.placement.activations.assign(static_cast<std::size_t>(blocks), {true, Tier::kNvme});
  for (std::int64_t from_last = 0; from_last < std::min(blocks, on_gpu + on_host); ++from_last) {
    config.placement.activations[static_cast<std::size_t>(blocks - 1 - from_last)].tier =
        from_last < on_gpu ? Tier::kGpu : Tier::kHost;
  }
  return with_host_blocks(request, config);
}

// Note: fuyou's activation placement. A checkpoint on the device costs no time and competes with
// nothing the planner chooses; one in host memory competes with the host blocks (a host block
// saves reading its parameters from NVMe twice a step and writing them once; a host checkpoint
// saves writing and reading the checkpoint once). So, with as many checkpoints on the device as
// fit, every count in host memory is tried, the host blocks taking what is left, and the fewest
// in host memory that is no slower than the fastest step wins; then the device keeps the fewest
// checkpoints that are no slower either. A swap that the other resources hide costs nothing, and
// memory the plan does not count (the allocator's fragmentation, the CUDA context) is better
// left free. The step only gets faster with more checkpoints on the device, so that count is a
// binary search. The tolerance is for rounding only.
constexpr double kTieTolerance = 1e-9;

Candidate choose_fuyou_activations(const PlanRequest& request) {
  const std::int64_t blocks = request.model.num_layers;
  // With every checkpoint on the device none arrives in backward, so that count is tried alone.
  auto device_holds = [&](std::int64_t on_gpu) {
    const Sizing sizing = detail::size_tiers(request, fuyou_placement(request, on_gpu, 0));
    const std::uint64_t limit = detail::tier_limit(request, Tier::kGpu);
    return limit == 0 || sizing.tier_bytes[static_cast<int>(Tier::kGpu)] <= limit;
  };
  const std::int64_t gpu_most =
      device_holds(blocks) ? blocks : largest_that_works(0, blocks - 1, device_holds).value_or(0);

  // Note: not a search that stops once the host is full: checkpoints on NVMe stage through the
  // host, so moving the last ones from NVMe to the host may fit where fewer did not.
  std::vector<Candidate> by_host;
  for (std::int64_t on_host = 0; on_host <= blocks - gpu_most; ++on_host) {
    by_host.push_back(evaluate(request, fuyou_placement(request, gpu_most, on_host)));
  }
  const Candidate* fastest = &by_host.front();
  for (const Candidate& candidate : by_host) {
    if (better(candidate, *fastest, 0)) fastest = &candidate;
  }
  std::size_t on_host = 0;
  while (better(*fastest, by_host[on_host], kTieTolerance)) ++on_host;

  std::int64_t low = 0, high = gpu_most;
  while (low < high) {
    const std::int64_t middle = low + (high - low) / 2;
    const Candidate candidate = evaluate(request, fuyou_placement(request, middle, static_cast<std::int64_t>(on_host)));
    if (better(*fastest, candidate, kTieTolerance)) {
      low = middle + 1;
    } else {
      high = middle;
    }
  }
  if (low == gpu_most) return by_host[on_host];
  return evaluate(request, fuyou_placement(request, low, static_cast<std::int64_t>(on_host)));
}


// Why auto placed the job as it did, for `ferry plan`.
std::vector<std::string> auto_notes(const Plan& plan) {
  const Placement& placement = plan.placement;
  std::size_t cpu = 0, streamed = 0, recomputed = 0;
  for (const PartPlacement& home : placement.parts) {
    cpu += !home.updated_on_gpu();
    streamed += home.streamed();
  }
  for (const BlockActivations& block : placement.activations) recomputed += block.recompute;
  std::vector<std::string> notes;
  if (cpu == 0 && recomputed == 0) {
    notes.push_back("everything fits on the gpu: it updates every part, and every block keeps its graph");
    return notes;
  }
  const double cpu_busy = plan.busy_seconds[static_cast<int>(Resource::kCpuOptimizer)];
  notes.push_back(detail::concat(
      "the gpu budget (", format_bytes(plan.tier_budget[0]), ") holds the optimizer state of ",
      placement.parts.size() - cpu, " of ", placement.parts.size(), " parts: the cpu updates the other ", cpu,
      " (the head and the last blocks first, which have the rest of backward to hide under), busy ",
      cpu_busy, " s of the predicted ", plan.step_seconds, " s step"));
  if (recomputed > 0) {
    notes.push_back(detail::concat(recomputed, " blocks recompute from a checkpoint where letting the cpu update ",
                                   "more would have cost more time per byte freed"));
  }
  if (streamed > 0) notes.push_back(detail::concat(streamed, " blocks stream their parameters: the rest still did not fit"));
  return notes;
}

// --- the auto placement -----------------------------------------------------------------------
// Note: how auto places a job. It starts from everything on the device (every block keeping its
// graph, every part updated there) and walks a path of single moves that each free GPU memory:
// recompute one more block from a checkpoint (from the last block down), let the CPU update one
// more part (in backward order: the head first, then the last blocks, whose updates have the
// rest of backward to hide under), send one more recomputed block's checkpoint to host memory,
// stream one more CPU-updated block's parameters from host memory. Each move is the one whose
// predicted step grows least per byte it frees, so CPU updates come first while they hide under
// backward, and recomputation once they no longer do. The path depends on the model and the
// hardware only; the GPU budget decides how far along it the job goes (the first state that fits
// is the fastest of those that fit), and what leaves the GPU goes to host memory until the host
// budget is full, then to NVMe in a fixed order: checkpoints, the CPU parts' optimizer states
// (the parts updated last first), their gradients, streamed parameters. So a smaller budget moves
// roles to slower tiers and never back.
struct AutoState {
  std::size_t recomputed = 0;  // blocks recomputed from a checkpoint, the last ones
  std::size_t cpu_parts = 0;   // parts the CPU updates: the head, then the blocks from the last down, then the stem
  std::size_t swapped = 0;     // recomputed blocks whose checkpoint lives in host memory or on NVMe
  std::size_t streamed = 0;    // CPU-updated blocks whose parameters stream, the last ones
  std::size_t nvme_moves = 0;  // steps along the fixed order of moves to NVMe
};

// One move of a part's role or a checkpoint to NVMe, in the order auto makes them.
struct NvmeMove {
  enum Kind { kCheckpoint, kOptimizerState, kGradients, kParameters } kind;
  std::size_t index;  // block or part
};

// The moves to NVMe, in their fixed order, of what a placement keeps in host memory.
std::vector<NvmeMove> nvme_moves(const EngineConfig& config) {
  std::vector<NvmeMove> moves;
  if (config.nvme_directories.empty()) return moves;
  const Placement& placement = config.placement;
  const std::size_t parts = placement.parts.size();
  for (std::size_t i = 0; i < placement.activations.size(); ++i) {
    if (placement.activations[i].tier == Tier::kHost) moves.push_back({NvmeMove::kCheckpoint, i});
  }
  for (NvmeMove::Kind kind : {NvmeMove::kOptimizerState, NvmeMove::kGradients}) {
    for (std::size_t p = 0; p < parts; ++p) {
      if (!placement.parts[p].updated_on_gpu()) moves.push_back({kind, p});
    }
  }
  for (std::size_t p = 1; p + 1 < parts; ++p) {
    if (placement.parts[p].params == Tier::kHost) moves.push_back({NvmeMove::kParameters, p});
  }
  return moves;
}

EngineConfig auto_config(const PlanRequest& request, const AutoState& state) {
  const std::size_t blocks = static_cast<std::size_t>(request.model.num_layers);
  const std::size_t parts = blocks + 2;
  EngineConfig config = request.engine;
  config.mode = Mode::kAuto;
  Placement& placement = config.placement;
  placement.parts.assign(parts, PartPlacement{});
  placement.activations.assign(blocks, BlockActivations{false, Tier::kGpu});
  auto cpu = [&](std::size_t p) { return parts - 1 - p < state.cpu_parts; };
  for (std::size_t p = 0; p < parts; ++p) {
    if (!cpu(p)) continue;
    PartPlacement& home = placement.parts[p];
    home.grads = home.master = home.accumulator = Tier::kHost;
    for (Tier& tier : home.states) tier = Tier::kHost;
    const bool block = p > 0 && p + 1 < parts;
    if (block && p > blocks - state.streamed) home.params = Tier::kHost;
  }
  for (std::size_t i = blocks - state.recomputed; i < blocks; ++i) {
    placement.activations[i] = {true, i < blocks - state.recomputed + state.swapped ? Tier::kHost : Tier::kGpu};
  }
  const std::vector<NvmeMove> moves = nvme_moves(config);
  for (std::size_t k = 0; k < std::min(state.nvme_moves, moves.size()); ++k) {
    const NvmeMove& move = moves[k];
    switch (move.kind) {
      case NvmeMove::kCheckpoint: placement.activations[move.index].tier = Tier::kNvme; break;
      case NvmeMove::kOptimizerState: {
        PartPlacement& home = placement.parts[move.index];
        home.master = home.accumulator = Tier::kNvme;
        for (Tier& tier : home.states) tier = Tier::kNvme;
        break;
      }
      case NvmeMove::kGradients: placement.parts[move.index].grads = Tier::kNvme; break;
      case NvmeMove::kParameters: placement.parts[move.index].params = Tier::kNvme; break;
    }
  }
  return config;
}

bool tier_fits(const PlanRequest& request, const Sizing& sizing, Tier tier) {
  const std::uint64_t limit = detail::tier_limit(request, tier);
  return limit == 0 || sizing.tier_bytes[static_cast<int>(tier)] <= limit;
}

// Whether `field` can grow by one in `state`.
bool can_move(const PlanRequest& request, const AutoState& state, std::size_t AutoState::*field) {
  const auto blocks = static_cast<std::size_t>(request.model.num_layers);
  const std::size_t cpu_blocks = state.cpu_parts <= 1 ? 0 : std::min(blocks, state.cpu_parts - 1);
  if (field == &AutoState::recomputed) return state.recomputed < blocks;
  if (field == &AutoState::cpu_parts) return state.cpu_parts < blocks + 2;
  if (field == &AutoState::swapped) return state.swapped < state.recomputed;
  return state.streamed < std::min(cpu_blocks, state.recomputed);
}

Candidate plan_auto(const PlanRequest& request) {
  auto evaluate_state = [&](const AutoState& state) { return evaluate(request, auto_config(request, state)); };
  AutoState state;
  Candidate current = evaluate_state(state);
  while (!tier_fits(request, current.sizing, Tier::kGpu)) {
    std::optional<std::pair<AutoState, Candidate>> best;
    double best_cost = 0;
    const std::uint64_t gpu_now = current.sizing.tier_bytes[static_cast<int>(Tier::kGpu)];
    // Note: the first swapped checkpoint or streamed block brings the pool its copies travel
    // through, so one such move may take more than it frees: a move repeats until it frees some.
    for (std::size_t AutoState::*field :
         {&AutoState::recomputed, &AutoState::cpu_parts, &AutoState::swapped, &AutoState::streamed}) {
      AutoState moved = state;
      std::optional<Candidate> freed;
      while (can_move(request, moved, field)) {
        ++(moved.*field);
        Candidate candidate = evaluate_state(moved);
        if (candidate.sizing.tier_bytes[static_cast<int>(Tier::kGpu)] < gpu_now) {
          freed = std::move(candidate);
          break;
        }
      }
      if (!freed) continue;
      Candidate& candidate = *freed;
      const std::uint64_t gpu = candidate.sizing.tier_bytes[static_cast<int>(Tier::kGpu)];
      const double slower = std::max(0.0, candidate.step.step_seconds - current.step.step_seconds);
      const double cost = slower / static_cast<double>(gpu_now - gpu);
      const bool wins = !best || cost < best_cost ||
                        (cost == best_cost && gpu < best->second.sizing.tier_bytes[static_cast<int>(Tier::kGpu)]);
      if (wins) {
        best_cost = cost;
        best.emplace(moved, std::move(candidate));
      }
    }
    if (!best) break;  // nothing left to move off the device: it does not fit
    state = best->first;
    current = std::move(best->second);
  }
  const std::size_t moves = nvme_moves(auto_config(request, state)).size();
  auto host_and_nvme_fit = [&](const Candidate& c) {
    return tier_fits(request, c.sizing, Tier::kHost) && tier_fits(request, c.sizing, Tier::kNvme);
  };
  for (state.nvme_moves = 0; !host_and_nvme_fit(current) && state.nvme_moves < moves;) {
    ++state.nvme_moves;
    current = evaluate_state(state);
  }
  return current;
}

Candidate plan_in_order(const PlanRequest& request) {
  if (request.engine.mode == Mode::kAuto && request.engine.placement.parts.empty()) return plan_auto(request);
  if (request.engine.mode == Mode::kFuyou && request.choose_activations) {
    return choose_fuyou_activations(request);
  }
  EngineConfig config = request.engine;
  config.placement.activations = detail::engine_activations(request);
  return evaluate(request, with_host_blocks(request, config));
}

// Note: the micro-batch order. Layer-major streams each block once per step instead of once per
// micro-batch and sends each part's gradients down once, as fp32 sums, but keeps every
// micro-batch's checkpoints and needs the sums' device copies: it wins where streaming, PCIe or
// NVMe bounds the step, and needs memory for it. Each order is planned with its own activations
// and host blocks; a tie keeps batch-major, which holds less, and so does a request that fits in
// neither (its shortfalls and fixes are the smaller).
Candidate plan_candidate(const PlanRequest& request) {
  const bool choose = request.choose_micro_batch_order && request.engine.grad_accumulation > 1 &&
                      request.engine.mode != Mode::kZo2;
  if (!choose) return plan_in_order(request);
  PlanRequest batch_major = request;
  batch_major.engine.micro_batch_order = MicroBatchOrder::kBatchMajor;
  PlanRequest layer_major = request;
  layer_major.engine.micro_batch_order = MicroBatchOrder::kLayerMajor;
  Candidate by_batch = plan_in_order(batch_major);
  Candidate by_layer = plan_in_order(layer_major);
  return by_layer.fits && better(by_layer, by_batch, kTieTolerance) ? by_layer : by_batch;
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
  const Mode mode = config.mode;
  if (mode != Mode::kGpu) {
    need(hw.pcie_h2d_gbps, "PCIe host-to-device bandwidth", "pcie-h2d-gbps");
    need(hw.pcie_d2h_gbps, "PCIe device-to-host bandwidth", "pcie-d2h-gbps");
  }
  if (mode == Mode::kZeroOffload || mode == Mode::kFuyou || mode == Mode::kAuto) {
    need(hw.cpu_adam_params_per_s, "CPU optimizer throughput", "cpu-adam-params-per-s");
  }
  const bool uses_nvme = mode == Mode::kFuyou || (mode == Mode::kZo2 && config.zo.block_tier == Tier::kNvme) ||
                         (mode == Mode::kAuto && !config.nvme_directories.empty());
  if (uses_nvme) {
    FERRY_CHECK(!config.nvme_directories.empty(), to_string(mode),
                " mode keeps state on NVMe: pass --nvme DIR[,DIR...]");
    need(hw.nvme_read_gbps(config.nvme_directories), "NVMe read bandwidth", "nvme-read-gbps");
    need(hw.nvme_write_gbps(config.nvme_directories), "NVMe write bandwidth", "nvme-write-gbps");
  }
  FERRY_CHECK(request.world_size >= 1, "world_size = ", request.world_size, " is invalid: at least 1 rank");
  FERRY_CHECK(hw.link_gbps >= 0 && std::isfinite(hw.link_gbps), "link_gbps = ", hw.link_gbps,
              " is invalid: a bandwidth in GB/s, or 0 when unknown");
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

// A size as a flag takes it, rounded up so that it holds `bytes`: "36.51GiB".
std::string flag_size(std::uint64_t bytes) {
  static const char* const kUnits[] = {"", "KiB", "MiB", "GiB", "TiB"};
  int unit = 0;
  double value = static_cast<double>(bytes);
  while (value >= 1024 && unit < 4) {
    value /= 1024;
    ++unit;
  }
  char text[32];
  std::snprintf(text, sizeof text, unit == 0 ? "%.0f%s" : "%.2f%s", unit == 0 ? value : std::ceil(value * 100) / 100,
                kUnits[unit]);
  return text;
}

// Note: the fixes, smallest first: what the budgets would have to be; the engine's activation
// knobs; a smaller micro-batch (with accumulation keeping the tokens per step); another mode.
// Each is planned with its change, and offered only when that plan fits.
std::vector<std::string> find_fixes(const PlanRequest& request, const Candidate& failed) {
  std::vector<std::string> fixes;
  auto fitting = [&](const PlanRequest& changed) -> std::optional<Candidate> {
    std::optional<Candidate> candidate = try_plan(changed);
    if (candidate && candidate->fits) return candidate;
    return std::nullopt;
  };
  const char* flags[kTierCount] = {"--gpu-budget", "--host-budget", "--nvme-budget"};
  PlanRequest raised = request;
  std::uint64_t* budgets[kTierCount] = {&raised.engine.gpu_budget_bytes, &raised.engine.host_budget_bytes,
                                        &raised.engine.nvme_budget_bytes};
  std::string raises;
  for (Tier tier : {Tier::kGpu, Tier::kHost, Tier::kNvme}) {
    const std::uint64_t needed = failed.sizing.tier_bytes[static_cast<int>(tier)];
    const std::uint64_t limit = detail::tier_limit(request, tier);
    if (limit == 0 || needed <= limit) continue;
    const std::uint64_t physical = tier == Tier::kGpu    ? request.hardware.gpu_memory_bytes
                                   : tier == Tier::kHost ? request.hardware.host_memory_bytes /
                                                                               static_cast<std::uint64_t>(request.world_size)
                                                         : 0;
    if (physical > 0 && needed > physical) continue;
    const std::string size = flag_size(needed);
    *budgets[static_cast<int>(tier)] = parse_bytes(size);  // planned as the user will type it
    raises += detail::concat(raises.empty() ? "" : " ", flags[static_cast<int>(tier)], " ", size);
  }
  if (!raises.empty()) {
    if (auto candidate = fitting(raised)) fixes.push_back("raise the budgets: " + raises + describe_time(*candidate));
  }
  const Mode mode = request.engine.mode;
  const bool first_order_in_core = mode == Mode::kGpu || mode == Mode::kZeroOffload;
  if (first_order_in_core && request.engine.placement.activations.empty() && request.engine.keep_graph_blocks > 0) {
    auto keep = largest_that_works(0, std::min(request.engine.keep_graph_blocks, request.model.num_layers) - 1,
                                   [&](std::int64_t k) {
                                     PlanRequest changed = request;
                                     changed.engine.keep_graph_blocks = k;
                                     return fitting(changed).has_value();
                                   });
    if (keep) fixes.push_back(detail::concat("keep fewer graphs: --keep-graph-blocks ", *keep));
  }
  if (first_order_in_core && !request.engine.offload_checkpoints) {
    PlanRequest changed = request;
    changed.engine.offload_checkpoints = true;
    changed.engine.keep_graph_blocks = 0;
    changed.engine.placement.activations.clear();
    if (auto candidate = fitting(changed)) {
      fixes.push_back("offload the checkpoints to the host: offload_checkpoints: true (job file), --keep-graph-blocks 0" +
                      describe_time(*candidate));
    }
  }
  if (mode != Mode::kZo2 && request.batch > 1) {
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
  for (Mode other : {Mode::kAuto, Mode::kZeroOffload, Mode::kFuyou, Mode::kZo2}) {
    if (other == mode) continue;
    PlanRequest changed = request;
    changed.engine.mode = other;
    changed.engine.placement = {};
    if (other == Mode::kFuyou) {
      changed.engine.keep_graph_blocks = 0;  // fuyou recomputes every block
      changed.engine.offload_checkpoints = false;
    }
    if (auto candidate = fitting(changed)) {
      fixes.push_back(detail::concat("switch mode: --mode ", to_string(other), describe_time(*candidate)));
    }
  }
  if (fixes.empty()) {
    fixes.push_back(request.engine.nvme_directories.empty()
                        ? "none found: the model does not fit this hardware in any mode without NVMe; fuyou and auto "
                          "can keep parameters and optimizer states there: --mode auto --nvme DIR[,DIR...]"
                        : "none found: the model does not fit this hardware in any mode at batch 1; add NVMe "
                          "directories or memory");
  }
  return fixes;
}

// The micro-batch with the most tokens/s that fits, among the powers of two up to max_batch: a
// larger batch needs more memory, so the search stops at the first that does not fit. When none
// fits, batch 1, whose plan names the fixes.
std::pair<PlanRequest, Candidate> choose_batch(const PlanRequest& request) {
  FERRY_CHECK(request.max_batch >= 0, "max_batch = ", request.max_batch,
              " is invalid: use 0 (plan the given batch) or the largest micro-batch to try");
  if (request.max_batch == 0) return {request, plan_candidate(request)};
  std::optional<std::pair<PlanRequest, Candidate>> best;
  for (std::int64_t batch = 1; batch <= request.max_batch; batch *= 2) {
    PlanRequest changed = request;
    changed.batch = batch;
    Candidate candidate = plan_candidate(changed);
    if (!candidate.fits && best) break;
    // Sequences per second: the sequence length and accumulation are the same for every batch.
    auto rate = [](std::int64_t b, const Candidate& c) { return static_cast<double>(b) / c.step.step_seconds; };
    if (!best || (candidate.fits && rate(batch, candidate) > rate(best->first.batch, best->second))) {
      best.emplace(std::move(changed), std::move(candidate));
    }
    if (!best->second.fits) break;
  }
  return std::move(*best);
}

void check_measured(const PlanRequest& request) {
  if (!request.measured) return;
  const MeasuredCompute& measured = *request.measured;
  FERRY_CHECK(measured.batch >= 1 && measured.seq >= 1, "measured compute at batch ", measured.batch, " x seq ",
              measured.seq, " is invalid: give the micro-batch and sequence length it was measured at");
  const std::size_t parts = static_cast<std::size_t>(request.model.num_layers) + 2;
  FERRY_CHECK(measured.part_forward_seconds.size() == parts && measured.part_backward_seconds.size() == parts,
              "measured compute has ", measured.part_forward_seconds.size(), " forward and ",
              measured.part_backward_seconds.size(), " backward times but the model has ", parts,
              " parts (stem, ", request.model.num_layers, " blocks, head): trace a step of this model");
  for (const std::vector<double>* times : {&measured.part_forward_seconds, &measured.part_backward_seconds}) {
    for (std::size_t part = 0; part < parts; ++part) {
      const double seconds = (*times)[part];
      FERRY_CHECK(seconds >= 0 && std::isfinite(seconds), "measured compute of part ", part, " is ", seconds,
                  " s: it must be finite and >= 0");
    }
  }
  FERRY_CHECK(measured.cpu_update_params_per_s >= 0 && std::isfinite(measured.cpu_update_params_per_s),
              "measured CPU update rate ", measured.cpu_update_params_per_s,
              " parameters/s is invalid: give a finite rate > 0, or 0 for none measured");
}

}  // namespace

Plan make_plan(const PlanRequest& given) {
  check_hardware(given);
  check_measured(given);
  auto [request, chosen] = choose_batch(given);
  Plan plan;
  plan.request = request;
  plan.items = chosen.sizing.items;
  plan.activations = chosen.sizing.config.placement.activations;
  plan.placement = chosen.sizing.placement;
  plan.host_blocks = chosen.sizing.config.mode == Mode::kFuyou ? chosen.sizing.config.fuyou.host_blocks : 0;
  plan.micro_batch_order = chosen.sizing.config.micro_batch_order;
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
  const double useful_flops = request.engine.mode == Mode::kZo2
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
  if (request.engine.mode == Mode::kAuto && request.engine.placement.parts.empty()) plan.placement_notes = auto_notes(plan);
  return plan;
}

EngineConfig plan_engine_config(const Plan& plan) {
  EngineConfig config = plan.request.engine;
  config.placement.activations = plan.activations;
  if (config.mode == Mode::kAuto) config.placement = plan.placement;
  config.micro_batch_order = plan.micro_batch_order;
  if (config.mode == Mode::kFuyou) config.fuyou.host_blocks = plan.host_blocks;
  // What the plan keeps beside the store's bundles on the device (graphs, working activations):
  // the store leaves it free, so the whole device use stays within the GPU budget.
  config.gpu_working_bytes = 0;
  if (config.gpu_budget_bytes == 0) return config;  // no budget to share
  for (const PlanItem& item : plan.items) {
    if (item.tier == Tier::kGpu && detail::is_activation(item.role)) config.gpu_working_bytes += item.bytes;
  }
  return config;
}

}  // namespace ferry
