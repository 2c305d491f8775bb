// `ferry bench finetune`: tokens/s, model TFLOPS (6 x parameters x tokens / s) and peak GPU
// memory of ferry's modes on one model shape, against a plain LibTorch loop over the same model
// in the same run (the whole model on the device in bf16: one autograd graph, torch's fused
// AdamW where the LibTorch version has it). Fuyou rows add the NVMe bytes read and written per
// step and the step's lower bound: max(the gpu mode's step with the same recomputation, NVMe
// bytes / the NVMe bandwidth measured in the same run). With --delayed-update, each zero-offload
// row is followed by one with the one-step delayed parameter update.

#include <chrono>
#include <cstdio>
#include <cxxopts.hpp>
#include <iostream>
#include <optional>

#include <torch/torch.h>
#include <torch/version.h>

#include "cli/command.h"
#include "ferry/engine.h"
#include "ferry/memory.h"
#include "ferry/model.h"
#include "ferry/plan.h"
#include "ferry/system.h"

namespace ferry::cli {
namespace {

using Clock = std::chrono::steady_clock;

struct Figures {
  std::string what;
  std::int64_t batch = 0;
  std::int64_t micro_batches = 1;  // per step
  double seconds_per_step = 0;
  double tokens_per_s = 0;
  double tflops = 0;
  std::uint64_t peak_bytes = 0;
  std::string note;
  // Per timed step, through the NVMe tier.
  std::uint64_t nvme_read_bytes = 0;
  std::uint64_t nvme_written_bytes = 0;
};

// What the offload modes get beyond the mode: budgets, NVMe and fuyou's settings.
struct OffloadSettings {
  std::uint64_t gpu_budget = 0;
  std::uint64_t host_budget = 0;
  std::vector<std::string> nvme;
  std::string activations;  // one tier for every block, or a list; empty: the mode's default
  FuyouConfig fuyou;
  std::int64_t grad_accumulation = 1;
  MicroBatchOrder order = MicroBatchOrder::kBatchMajor;
  bool delayed_update = false;  // zero-offload: ZeRO-Offload's DPU, from the first step
  std::optional<Hardware> hardware;  // auto: the figures it plans with
  // Auto: trace each part's compute, compare the blocks' with the plan's and predict the whole
  // preset (`full` blocks, when --layers cut it) from the measured block times.
  bool trace_blocks = false;
  std::optional<models::ModelConfig> full;
};

// The mean seconds of the plan's spans named `prefix` + "block.N", over the step it reports.
double planned_block_seconds(const Plan& plan, const std::string& prefix) {
  double sum = 0;
  int count = 0;
  for (const PlanSpan& span : plan.spans) {
    if (span.resource != Resource::kCompute || span.name.rfind(prefix + "block.", 0) != 0) continue;
    sum += span.end_s - span.start_s;
    ++count;
  }
  return count ? sum / count : 0;
}

// The measured compute of a step's blocks (their mean), the stem and the head, extended to
// `blocks` blocks: what the planner replays for a model cut by --layers, at full depth.
MeasuredCompute at_depth(const EngineStats& stats, int steps, std::int64_t batch, std::int64_t seq,
                         std::int64_t blocks) {
  MeasuredCompute measured{batch, seq, {}, {}};
  const std::size_t parts = stats.part_forward_seconds.size();
  auto mean_block = [&](const std::vector<double>& seconds) {
    double sum = 0;
    for (std::size_t p = 1; p + 1 < parts; ++p) sum += seconds[p];
    return sum / static_cast<double>(parts - 2) / steps;
  };
  for (const std::vector<double>* seconds : {&stats.part_forward_seconds, &stats.part_backward_seconds}) {
    std::vector<double>& out = seconds == &stats.part_forward_seconds ? measured.part_forward_seconds
                                                                      : measured.part_backward_seconds;
    out.push_back(seconds->front() / steps);
    out.insert(out.end(), static_cast<std::size_t>(blocks), mean_block(*seconds));
    out.push_back(seconds->back() / steps);
  }
  return measured;
}

// Runs `step` warmup times, then times `steps` of them with the device drained around the timing.
template <typename Step>
double seconds_per_step(int warmup, int steps, Step step) {
  for (int i = 0; i < warmup; ++i) step(i);
  synchronize_gpu();
  auto start = Clock::now();
  for (int i = 0; i < steps; ++i) step(warmup + i);
  synchronize_gpu();
  return std::chrono::duration<double>(Clock::now() - start).count() / steps;
}

Figures finish(Figures figures, const models::ModelConfig& config, std::int64_t seq) {
  const double tokens = static_cast<double>(figures.batch * seq * figures.micro_batches);
  figures.tokens_per_s = tokens / figures.seconds_per_step;
  figures.tflops = 6.0 * static_cast<double>(config.parameter_count()) * figures.tokens_per_s / 1e12;
  figures.peak_bytes = gpu_memory_stats().peak_allocated_bytes;
  return figures;
}

Figures run_plain_libtorch(const models::ModelConfig& config, torch::Device device,
                           std::int64_t batch, std::int64_t seq, int warmup, int steps) {
  release_cached_gpu_memory();
  reset_gpu_peak_memory();
  LayeredModel model = models::build(config, 1);
  model.to(device, torch::kBFloat16);
  std::vector<torch::Tensor> params = model.parameters();
  Figures figures{"plain LibTorch, bf16", batch};
  std::vector<data::Batch> batches;
  for (int i = 0; i < 2; ++i) batches.push_back(data::random_batch(batch, seq, config.vocab_size, i));
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  std::vector<torch::Tensor> exp_avg, exp_avg_sq, grads, state_steps;
  for (const torch::Tensor& p : params) {
    exp_avg.push_back(torch::zeros_like(p));
    exp_avg_sq.push_back(torch::zeros_like(p));
    state_steps.push_back(torch::zeros({}, p.options().dtype(torch::kFloat)));
  }
  figures.note = "at::_fused_adamw_";
  auto optimizer_step = [&] {
    torch::NoGradGuard no_grad;
    grads.clear();
    for (const torch::Tensor& p : params) grads.push_back(p.grad());
    for (torch::Tensor& s : state_steps) s.add_(1);
    at::_fused_adamw_(params, grads, exp_avg, exp_avg_sq, {}, state_steps, 1e-5, 0.9, 0.999, 0.0,
                      1e-8, false, false);
  };
#else
  torch::optim::AdamW adamw(params, torch::optim::AdamWOptions(1e-5).weight_decay(0.0));
  figures.note = "torch::optim::AdamW";
  auto optimizer_step = [&] { adamw.step(); };
#endif
  figures.seconds_per_step = seconds_per_step(warmup, steps, [&](int i) {
    const data::Batch& b = batches[static_cast<size_t>(i) % batches.size()];
    torch::Tensor tokens = b.input_ids.to(device);
    torch::Tensor loss = model.loss(model.forward(tokens), b.labels.to(device));
    loss.backward();
    optimizer_step();
    for (torch::Tensor& p : params) p.mutable_grad() = torch::Tensor();
  });
  return finish(figures, config, seq);
}

Figures run_ferry(const models::ModelConfig& config, Mode mode, torch::Device device,
                  std::int64_t batch, std::int64_t seq, int warmup, int steps,
                  std::int64_t keep_graph_blocks, const OffloadSettings& offload) {
  // Note: the previous run's blocks, cached by the allocator, would split and fragment under
  // this one's allocations; each run starts from an empty cache.
  release_cached_gpu_memory();
  reset_gpu_peak_memory();
  EngineConfig engine_config;
  engine_config.mode = mode;
  engine_config.precision = Precision::kBF16;
  engine_config.device = device;
  engine_config.optimizer.lr = 1e-5;
  engine_config.keep_graph_blocks = mode == Mode::kFuyou ? 0 : keep_graph_blocks;
  if (mode != Mode::kGpu) {
    engine_config.gpu_budget_bytes = offload.gpu_budget;
    engine_config.host_budget_bytes = offload.host_budget;
  }
  engine_config.nvme_directories = offload.nvme;
  engine_config.grad_accumulation = offload.grad_accumulation;
  engine_config.micro_batch_order = offload.order;
  engine_config.delayed_update.enabled = offload.delayed_update;
  if (mode == Mode::kFuyou) {
    engine_config.fuyou = offload.fuyou;
    if (!offload.activations.empty()) {
      engine_config.placement.activations = parse_activations(offload.activations, config.num_layers);
    }
  }
  // Auto: the planner places the job within the budgets, and its prediction is compared.
  std::optional<Plan> plan;
  if (mode == Mode::kAuto) {
    PlanRequest request;
    request.model = config;
    request.engine = engine_config;
    request.engine.fuyou.blocks_in_flight = offload.fuyou.blocks_in_flight;
    request.batch = batch;
    request.seq = seq;
    request.hardware = *offload.hardware;
    plan = make_plan(request);
    FERRY_CHECK(plan->fits, "auto finds no placement within the budgets:\n", format_plan(*plan));
    engine_config = plan_engine_config(*plan);
    engine_config.trace = offload.trace_blocks;
  }
  Engine engine(models::build(config, 1), engine_config);
  std::vector<data::Batch> batches;
  for (int i = 0; i < 2; ++i) batches.push_back(data::random_batch(batch, seq, config.vocab_size, i));
  Figures figures{std::string("ferry ") + to_string(mode) + ", bf16", batch, offload.grad_accumulation};
  if (offload.grad_accumulation > 1) figures.what += std::string(", ") + to_string(offload.order);
  if (offload.delayed_update) figures.what += ", delayed update";
  StoreStats before;
  figures.seconds_per_step = seconds_per_step(warmup, steps, [&](int i) {
    if (i == warmup) before = engine.stats().store;
    for (std::int64_t m = 0; m < offload.grad_accumulation; ++m) {
      engine.train_step(batches[static_cast<size_t>(m) % batches.size()]);
    }
    // The last step's delayed update is part of the timed work.
    if (i + 1 == warmup + steps) engine.flush();
  });
  EngineStats stats = engine.stats();
  auto per_step = [&](Tier from, Tier to) {
    const int f = static_cast<int>(from), t = static_cast<int>(to);
    return (stats.store.transfers[f][t].bytes - before.transfers[f][t].bytes) / static_cast<std::uint64_t>(steps);
  };
  figures.nvme_read_bytes = per_step(Tier::kNvme, Tier::kHost);
  figures.nvme_written_bytes = per_step(Tier::kHost, Tier::kNvme);
  char note[160];
  std::snprintf(note, sizeof note, "optimizer %.0f ms/step, waited %.0f ms/step",
                1e3 * stats.optimizer_seconds / (warmup + steps),
                1e3 * stats.optimizer_wait_seconds / (warmup + steps));
  figures.note = note + std::string(", keeps ") + std::to_string(engine_config.keep_graph_blocks) + " graphs";
  if (plan) {
    std::size_t cpu = 0, recomputed = 0, streamed = 0;
    for (const PartPlacement& home : plan->placement.parts) {
      cpu += !home.updated_on_gpu();
      streamed += home.streamed();
    }
    for (const BlockActivations& block : plan->placement.activations) recomputed += block.recompute;
    char placed[256];
    std::snprintf(placed, sizeof placed,
                  "; auto: %zu of %zu parts updated by the cpu, %zu blocks recomputed, %zu streamed; gpu %s, host %s, "
                  "nvme %s planned; plan predicts %.3f s (measured / predicted %.2f)",
                  cpu, plan->placement.parts.size(), recomputed, streamed,
                  format_bytes(plan->tier_bytes[0]).c_str(), format_bytes(plan->tier_bytes[1]).c_str(),
                  format_bytes(plan->tier_bytes[2]).c_str(), plan->step_seconds,
                  figures.seconds_per_step / plan->step_seconds);
    figures.note = note + std::string(placed);
    if (offload.trace_blocks) {
      const MeasuredCompute measured = at_depth(stats, warmup + steps, batch, seq, config.num_layers);
      const double forward = measured.part_forward_seconds[1], backward = measured.part_backward_seconds[1];
      const double plan_forward = planned_block_seconds(*plan, "forward ");
      const double plan_backward = planned_block_seconds(*plan, "recompute and backward ") +
                                   planned_block_seconds(*plan, "backward ");
      char blocks[512];
      std::snprintf(blocks, sizeof blocks,
                    "; traced (the device syncs at each part): a block's forward %.2f ms (plan %.2f, measured / "
                    "plan %.2f), backward %.2f ms (plan %.2f, %.2f)",
                    1e3 * forward, 1e3 * plan_forward, forward / plan_forward, 1e3 * backward, 1e3 * plan_backward,
                    backward / plan_backward);
      figures.note += blocks;
      if (offload.full && offload.full->num_layers > config.num_layers) {
        PlanRequest whole = plan->request;
        whole.model = *offload.full;
        whole.engine.placement = {};
        whole.measured = at_depth(stats, warmup + steps, batch, seq, offload.full->num_layers);
        const Plan predicted = make_plan(whole);
        char full[384];
        std::snprintf(full, sizeof full,
                      "; the whole model (%lld blocks) with these block times: %s, %.3f s/step, %.0f tokens/s, "
                      "gpu %s, host %s, nvme %s, bottleneck %s",
                      static_cast<long long>(offload.full->num_layers), predicted.fits ? "fits" : "does NOT fit",
                      predicted.step_seconds, predicted.tokens_per_s, format_bytes(predicted.tier_bytes[0]).c_str(),
                      format_bytes(predicted.tier_bytes[1]).c_str(), format_bytes(predicted.tier_bytes[2]).c_str(),
                      to_string(predicted.bottleneck));
        figures.note += full;
      }
    }
  }
  if (mode != Mode::kGpu) {
    const TierStats& host = stats.store.tiers[static_cast<int>(Tier::kHost)];
    figures.note += ", peak host " + format_bytes(host.peak_bytes);
  }
  return finish(figures, config, seq);
}

int run_bench_finetune(int argc, char** argv) {
  cxxopts::Options options(argv[0], "Measure ferry's modes against a plain LibTorch loop");
  options.add_options()
      ("model", "preset", cxxopts::value<std::string>()->default_value("llama-1.3b"))
      ("layers", "the preset's first N blocks only, every other dimension kept (0: all)",
       cxxopts::value<std::int64_t>()->default_value("0"))
      ("trace-blocks", "auto rows: trace each part's compute against the plan's, and predict the whole preset "
       "from the measured block times")
      ("calibration", "auto: the hardware figures it plans with, from `ferry bench calibrate` (default: a quick "
       "calibration of this machine)", cxxopts::value<std::string>()->default_value(""))
      ("modes", "ferry modes", cxxopts::value<std::vector<std::string>>()->default_value("gpu,zero-offload"))
      ("batches", "batch sizes", cxxopts::value<std::vector<std::int64_t>>()->default_value("8,16"))
      ("seq", "sequence length", cxxopts::value<std::int64_t>()->default_value("1024"))
      ("warmup", "untimed steps", cxxopts::value<int>()->default_value("2"))
      ("steps", "timed steps", cxxopts::value<int>()->default_value("5"))
      ("baseline", "also run the plain LibTorch loop", cxxopts::value<bool>()->default_value("true"))
      ("keep-graph", "blocks that keep their graph (-1: all, no recomputation, like the baseline)",
       cxxopts::value<std::int64_t>()->default_value("-1"))
      ("dtype", "dtype the model is built in on the host before ferry takes it", cxxopts::value<std::string>()->default_value("F32"))
      ("gpu-budget", "offload modes' GPU budget (0: none)", cxxopts::value<std::string>()->default_value("0"))
      ("host-budget", "offload modes' host budget (0: none)", cxxopts::value<std::string>()->default_value("0"))
      ("nvme", "NVMe directories (fuyou)", cxxopts::value<std::vector<std::string>>()->default_value(""))
      ("activations", "fuyou's checkpoints: gpu, host or nvme for every block, or one per block", cxxopts::value<std::string>()->default_value("nvme"))
      ("fuyou-host-blocks", "fuyou: blocks whose parameters stay in host memory", cxxopts::value<std::int64_t>()->default_value("0"))
      ("fuyou-window", "fuyou: blocks on the device at once", cxxopts::value<std::int64_t>()->default_value("3"))
      ("grad-accum", "ferry's micro-batches per step", cxxopts::value<std::int64_t>()->default_value("1"))
      ("micro-batch-order", "batch-major or layer-major", cxxopts::value<std::string>()->default_value("batch-major"))
      ("delayed-update", "also run each zero-offload row with the one-step delayed parameter update",
       cxxopts::value<bool>()->default_value("false"))
      ("h,help", "show this help");
  auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    return 0;
  }
  models::ModelConfig config =
      models::truncated(models::preset(args["model"].as<std::string>()), args["layers"].as<std::int64_t>());
  std::optional<DType> dtype = parse_dtype(args["dtype"].as<std::string>());
  FERRY_CHECK(dtype == DType::kF32 || dtype == DType::kBF16, "--dtype must be F32 or BF16");
  config.dtype = *dtype;
  const std::int64_t keep_graph = args["keep-graph"].as<std::int64_t>() < 0
                                      ? config.num_layers
                                      : args["keep-graph"].as<std::int64_t>();
  const torch::Device device = torch::cuda::is_available() ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
  const std::int64_t seq = args["seq"].as<std::int64_t>();
  const int warmup = args["warmup"].as<int>();
  const int steps = args["steps"].as<int>();
  OffloadSettings offload;
  offload.gpu_budget = parse_bytes(args["gpu-budget"].as<std::string>());
  offload.host_budget = parse_bytes(args["host-budget"].as<std::string>());
  for (const std::string& dir : args["nvme"].as<std::vector<std::string>>()) {
    if (!dir.empty()) offload.nvme.push_back(dir);
  }
  offload.activations = args["activations"].as<std::string>();
  offload.fuyou.host_blocks = args["fuyou-host-blocks"].as<std::int64_t>();
  offload.fuyou.blocks_in_flight = args["fuyou-window"].as<std::int64_t>();
  offload.grad_accumulation = args["grad-accum"].as<std::int64_t>();
  offload.order = parse_micro_batch_order(args["micro-batch-order"].as<std::string>());
  offload.trace_blocks = args.count("trace-blocks") > 0;
  offload.full = models::preset(args["model"].as<std::string>());
  offload.full->dtype = config.dtype;
  for (const std::string& mode : args["modes"].as<std::vector<std::string>>()) {
    if (parse_mode(mode) != Mode::kAuto || offload.hardware) continue;
    const std::string file = args["calibration"].as<std::string>();
    if (!file.empty()) {
      offload.hardware = Hardware::load(file);
    } else {
      CalibrationOptions quick;
      quick.nvme_directories = offload.nvme;
      quick.nvme_bytes = std::uint64_t{64} << 20;
      quick.repeat = 1;
      quick.quick = true;
      offload.hardware = calibrate(quick);
    }
  }
  // The NVMe figures the fuyou rows' lower bound divides by, measured here and now.
  std::optional<NvmeFigures> nvme;
  if (!offload.nvme.empty()) {
    CalibrationOptions calibration;
    calibration.nvme_directories = offload.nvme;
    calibration.nvme_bytes = std::uint64_t{2} << 30;
    calibration.repeat = 1;
    const Hardware measured = calibrate(calibration);
    nvme = NvmeFigures{"", measured.nvme_read_gbps(), measured.nvme_write_gbps()};
    std::printf("NVMe measured: read %.2f GB/s, write %.2f GB/s (io_uring, 2 GiB)\n", nvme->read_gbps,
                nvme->write_gbps);
  }
  std::printf("bench finetune: %s (%s parameters), sequence %lld, on %s, %s\n",
              args["model"].as<std::string>().c_str(), models::format_parameter_count(config.parameter_count()).c_str(),
              static_cast<long long>(seq), device.str().c_str(), probe_gpu_tier().description.c_str());
  std::printf("| %-40s | %5s | %8s | %9s | %7s | %9s | %8s | %s\n", "run", "batch", "s/step",
              "tokens/s", "TFLOPS", "peak GPU", "vs plain", "notes");
  for (std::int64_t batch : args["batches"].as<std::vector<std::int64_t>>()) {
    std::optional<Figures> baseline, gpu_mode;
    auto print = [&](const Figures& f) {
      std::string ratio = baseline ? std::to_string(f.tokens_per_s / baseline->tokens_per_s).substr(0, 4) + "x" : "";
      const std::string batch_text = std::to_string(f.batch) + (f.micro_batches > 1 ? "x" + std::to_string(f.micro_batches) : "");
      std::printf("| %-40s | %5s | %8.3f | %9.0f | %7.1f | %9s | %8s | %s\n", f.what.c_str(),
                  batch_text.c_str(), f.seconds_per_step, f.tokens_per_s, f.tflops,
                  format_bytes(f.peak_bytes).c_str(), ratio.c_str(), f.note.c_str());
      if (f.nvme_read_bytes + f.nvme_written_bytes > 0) {
        std::printf("|   NVMe per step: read %s, written %s", format_bytes(f.nvme_read_bytes).c_str(),
                    format_bytes(f.nvme_written_bytes).c_str());
        if (nvme && gpu_mode) {
          // Note: the disk serves reads and writes in turn, so their times add up.
          const double io_seconds = static_cast<double>(f.nvme_read_bytes) / (nvme->read_gbps * 1e9) +
                                    static_cast<double>(f.nvme_written_bytes) / (nvme->write_gbps * 1e9);
          const double bound = std::max(gpu_mode->seconds_per_step, io_seconds);
          std::printf("; bound max(compute %.3f s, NVMe %.3f s) = %.3f s; step / bound = %.2fx",
                      gpu_mode->seconds_per_step, io_seconds, bound, f.seconds_per_step / bound);
        }
        std::printf("\n");
      }
      std::fflush(stdout);
    };
    if (args["baseline"].as<bool>()) {
      try {
        baseline = run_plain_libtorch(config, device, batch, seq, warmup, steps);
        print(*baseline);
      } catch (const std::exception& error) {
        std::printf("| plain LibTorch, bf16 | %lld | failed: %s\n", static_cast<long long>(batch), error.what());
      }
    }
    for (const std::string& mode : args["modes"].as<std::vector<std::string>>()) {
      try {
        const Mode parsed = parse_mode(mode);
        Figures figures = run_ferry(config, parsed, device, batch, seq, warmup, steps, keep_graph, offload);
        if (parsed == Mode::kGpu) gpu_mode = figures;
        print(figures);
        if (parsed == Mode::kZeroOffload && args["delayed-update"].as<bool>()) {
          OffloadSettings delayed = offload;
          delayed.delayed_update = true;
          print(run_ferry(config, parsed, device, batch, seq, warmup, steps, keep_graph, delayed));
        }
      } catch (const std::exception& error) {
        std::printf("| ferry %s | %lld | failed: %s\n", mode.c_str(), static_cast<long long>(batch), error.what());
      }
    }
  }
  return 0;
}

}  // namespace

FERRY_CLI_COMMAND("bench finetune", "tokens/s, TFLOPS and peak GPU memory of ferry's modes vs plain LibTorch", run_bench_finetune);

}  // namespace ferry::cli
