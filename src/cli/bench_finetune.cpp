// `ferry bench finetune`: tokens/s, model TFLOPS (6 x parameters x tokens / s; with LoRA 4 x: no
// weight gradients for the frozen base) and peak GPU memory of ferry's modes on one model shape,
// against a plain LibTorch loop over the same model in the same run (cli/plain_loop.h: the whole
// model on the device in bf16, one autograd graph, torch's fused AdamW where the LibTorch version
// has it; with LoRA the same adapters over the same frozen base, AdamW over the adapters alone).
// Fuyou rows add the NVMe bytes read and written per step and the step's lower bound: max(the gpu
// mode's step with the same recomputation, NVMe bytes / the NVMe bandwidth measured in the same
// run). LoRA rows that stream add the PCIe bytes per step and the bound max(the gpu mode's step,
// bytes up / the pinned host-to-device bandwidth measured in the same run, bytes down / the
// device-to-host one). With --delayed-update, each zero-offload row is followed by one with the
// one-step delayed parameter update.

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cxxopts.hpp>
#include <filesystem>
#include <iostream>
#include <optional>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "cli/command.h"
#include "cli/job_options.h"
#include "cli/plain_loop.h"
#include "ferry/engine.h"
#include "ferry/job.h"
#include "ferry/memory.h"
#include "ferry/model.h"
#include "ferry/plan.h"
#include "ferry/system.h"

namespace ferry::cli {
namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;
using Json = nlohmann::json;

// Every run's AdamW learning rate, ferry's and the plain loop's.
constexpr double kLearningRate = 1e-5;

struct Figures {
  std::string what;
  std::int64_t batch = 0;
  std::int64_t micro_batches = 1;  // per step
  double seconds_per_step = 0;
  double tokens_per_s = 0;
  double tflops = 0;
  std::uint64_t peak_bytes = 0;
  std::string note;
  // Per timed step, through the NVMe tier and over PCIe.
  std::uint64_t nvme_read_bytes = 0;
  std::uint64_t nvme_written_bytes = 0;
  std::uint64_t pcie_up_bytes = 0;
  std::uint64_t pcie_down_bytes = 0;
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
  // Auto: plan again from a profile of the first plan's placement (profile_compute), as
  // `ferry finetune` does; off: the plan from FLOPs and the hardware figures alone runs.
  bool profile = true;
  BaseStorage base_storage = BaseStorage::kCompute;  // with LoRA
  // Auto with LoRA: every block's base (and its adapters, which the CPU then updates) at home on
  // this tier, streamed for each pass, instead of the planner's placement.
  std::optional<Tier> base_home;
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
  if (stats.cpu_update_seconds > 0) {
    measured.cpu_update_params_per_s = static_cast<double>(stats.cpu_updated_elements) / stats.cpu_update_seconds;
  }
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
  const double flops_per_parameter = config.lora.enabled() ? 4.0 : 6.0;
  figures.tflops = flops_per_parameter * static_cast<double>(config.parameter_count()) * figures.tokens_per_s / 1e12;
  figures.peak_bytes = gpu_memory_stats().peak_allocated_bytes;
  return figures;
}

// "ferry gpu LoRA, bf16, fp8 base": what ran.
std::string describe_run(const std::string& runner, const models::ModelConfig& config, BaseStorage base_storage) {
  std::string what = runner + (config.lora.enabled() ? " LoRA" : "") + ", bf16";
  if (base_storage == BaseStorage::kFp8) what += ", fp8 base";
  return what;
}

Figures run_plain_libtorch(const models::ModelConfig& config, torch::Device device,
                           std::int64_t batch, std::int64_t seq, int warmup, int steps) {
  release_cached_gpu_memory();
  reset_gpu_peak_memory();
  OptimizerConfig adamw;
  adamw.lr = kLearningRate;
  PlainLoop loop(config, 1, device, torch::kBFloat16, adamw);
  Figures figures{describe_run("plain LibTorch", config, BaseStorage::kCompute), batch};
  figures.note = loop.optimizer_name();
  if (config.lora.enabled()) {
    std::int64_t adapters = 0;
    for (const torch::Tensor& p : loop.trained()) adapters += p.numel();
    figures.note += " over the " + models::format_parameter_count(adapters) + " adapter parameters";
  }
  std::vector<data::Batch> batches;
  for (int i = 0; i < 2; ++i) batches.push_back(data::random_batch(batch, seq, config.vocab_size, i));
  figures.seconds_per_step = seconds_per_step(warmup, steps, [&](int i) {
    loop.step(batches[static_cast<size_t>(i) % batches.size()]);
  });
  return finish(figures, config, seq);
}

// Every block's base at home on `home` and streamed, its adapters updated by the CPU with their
// gradients and states in host memory, every block recomputed from a checkpoint on the device (a
// streamed block keeps no graph); the stem and the head (frozen alone) resident.
Placement streamed_base(std::int64_t blocks, Tier home) {
  PartPlacement block;
  block.params = home;
  block.grads = block.master = block.states[0] = block.states[1] = block.accumulator = Tier::kHost;
  Placement placement;
  placement.parts.assign(static_cast<std::size_t>(blocks) + 2, block);
  placement.parts.front() = placement.parts.back() = PartPlacement{};
  placement.activations.assign(static_cast<std::size_t>(blocks), BlockActivations{true, Tier::kGpu});
  return placement;
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
  engine_config.optimizer.lr = kLearningRate;
  engine_config.base_storage = offload.base_storage;
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
  // Auto: the planner places the job within the budgets, and its prediction is compared; or,
  // with --base-home, the base is streamed from there.
  std::vector<data::Batch> batches;
  for (int i = 0; i < 2; ++i) batches.push_back(data::random_batch(batch, seq, config.vocab_size, i));
  std::optional<Plan> plan;
  double from_flops = 0;  // the first plan's step, before the profile
  if (mode == Mode::kAuto && offload.base_home) {
    engine_config.placement = streamed_base(config.num_layers, *offload.base_home);
  } else if (mode == Mode::kAuto) {
    PlanRequest request;
    request.model = config;
    request.engine = engine_config;
    request.engine.fuyou.blocks_in_flight = offload.fuyou.blocks_in_flight;
    request.batch = batch;
    request.seq = seq;
    request.hardware = *offload.hardware;
    plan = make_plan(request);
    FERRY_CHECK(plan->fits, "auto finds no placement within the budgets:\n", format_plan(*plan));
    from_flops = plan->step_seconds;
    if (offload.profile) {
      request.measured = profile_compute(models::build(config, 1), plan_engine_config(*plan), batches.front());
      reset_gpu_peak_memory();
      plan = make_plan(request);
      FERRY_CHECK(plan->fits, "auto finds no placement within the budgets with the profiled compute:\n",
                  format_plan(*plan));
    }
    engine_config = plan_engine_config(*plan);
    engine_config.trace = offload.trace_blocks;
  }
  Engine engine(models::build(config, 1), engine_config);
  Figures figures{describe_run(std::string("ferry ") + to_string(mode), config, offload.base_storage), batch,
                  offload.grad_accumulation};
  if (mode == Mode::kAuto && offload.base_home) figures.what += std::string(", base on ") + to_string(*offload.base_home);
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
  figures.pcie_up_bytes = per_step(Tier::kHost, Tier::kGpu);
  figures.pcie_down_bytes = per_step(Tier::kGpu, Tier::kHost);
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
    char placed[384];
    std::snprintf(placed, sizeof placed,
                  "; auto: %zu of %zu parts updated by the cpu, %zu blocks recomputed, %zu streamed; gpu %s, host %s, "
                  "nvme %s planned; plan predicts %.3f s (measured / predicted %.2f%s); from FLOPs alone %.3f s "
                  "(%.2f)",
                  cpu, plan->placement.parts.size(), recomputed, streamed,
                  format_bytes(plan->tier_bytes[0]).c_str(), format_bytes(plan->tier_bytes[1]).c_str(),
                  format_bytes(plan->tier_bytes[2]).c_str(), plan->step_seconds,
                  figures.seconds_per_step / plan->step_seconds, offload.profile ? ", profiled compute" : "",
                  from_flops, figures.seconds_per_step / from_flops);
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

// Note: every flag's value is read strictly (an error names the flag, the value and what is
// valid), and a word no flag took is refused. cxxopts takes a true/false flag's value only after
// '=' (--baseline=false; --baseline alone is true), so `--baseline false` would otherwise run the
// baseline and drop "false".
std::string flag_text(const cxxopts::ParseResult& args, const std::string& flag) { return args[flag].as<std::string>(); }

std::int64_t integer_flag(const cxxopts::ParseResult& args, const std::string& flag, std::int64_t low,
                          std::int64_t high = INT64_MAX) {
  return parse_integer(flag_text(args, flag), "--" + flag, low, high);
}

bool boolean_flag(const cxxopts::ParseResult& args, const std::string& flag) {
  return parse_boolean(flag_text(args, flag), "--" + flag);
}

// A flag `ferry finetune` has too (setting `key`), read by its table's rules.
Json setting_flag(const cxxopts::ParseResult& args, const std::string& key) {
  const std::string flag = flag_name(key);
  const std::string text = flag_text(args, flag);
  return read_job_setting(key, text, "--" + flag + " " + text);
}

// `parse` of a flag's text, its error prefixed with the flag.
template <typename Parse>
auto parse_flag(const std::string& flag, const std::string& text, Parse parse) {
  try {
    return parse(text);
  } catch (const Error& error) {
    throw Error(detail::concat("--", flag, " ", text, ": ", error.what()));
  }
}

int run_bench_finetune(int argc, char** argv) {
  cxxopts::Options options(argv[0], "Measure ferry's modes against a plain LibTorch loop");
  auto text = [](const std::string& default_value) { return cxxopts::value<std::string>()->default_value(default_value); };
  auto boolean = [](const std::string& default_value) {
    return cxxopts::value<std::string>()->default_value(default_value)->implicit_value("true");
  };
  auto texts = [](const std::string& default_value) {
    return cxxopts::value<std::vector<std::string>>()->default_value(default_value);
  };
  options.add_options()
      ("model", "preset", text("llama-1.3b"))
      ("layers", "the preset's first N blocks only, every other dimension kept (0: all)", text("0"))
      ("trace-blocks", "auto rows: trace each part's compute against the plan's, and predict the whole preset "
       "from the measured block times")
      ("calibration", "auto: the hardware figures it plans with, a file from `ferry bench calibrate` or a "
       "hardware preset (default: a quick calibration of this machine)", text(""))
      ("profile", "auto rows: plan again from a profile of two steps of the first plan's placement, as `ferry "
       "finetune` does (--profile=false: the plan from FLOPs runs)", boolean("true"))
      ("modes", "ferry modes", texts("gpu,zero-offload"))
      ("batches", "batch sizes", texts("8,16"))
      ("seq", "sequence length", text("1024"))
      ("warmup", "untimed steps", text("2"))
      ("steps", "timed steps", text("5"))
      ("baseline", "also run the plain LibTorch loop (--baseline=false: not)", boolean("true"))
      ("keep-graph", "blocks that keep their graph (-1: all, no recomputation, like the baseline)", text("-1"))
      ("dtype", "dtype the model is built in on the host before ferry takes it: F32 or BF16", text("F32"))
      ("gpu-budget", "offload modes' GPU budget (0: none)", text("0"))
      ("host-budget", "offload modes' host budget (0: none)", text("0"))
      ("nvme", "NVMe directories (fuyou)", texts(""))
      ("activations", "fuyou's checkpoints: gpu, host or nvme for every block, or one per block", text("nvme"))
      ("fuyou-host-blocks", "fuyou: blocks whose parameters stay in host memory", text("0"))
      ("fuyou-window", "fuyou: blocks on the device at once", text("3"))
      ("grad-accum", "ferry's micro-batches per step", text("1"))
      ("micro-batch-order", "batch-major or layer-major", text("batch-major"))
      ("delayed-update", "also run each zero-offload row with the one-step delayed parameter update",
       boolean("false"))
      ("lora-rank", "LoRA adapters of this rank over a frozen base in every run, the plain loop's too (0: train "
       "every parameter)", text(flag_default("lora_rank")))
      ("lora-alpha", "LoRA's alpha", text(flag_default("lora_alpha")))
      ("lora-targets", "the linears LoRA adapts: PEFT target_modules names, comma-separated, or all-linear",
       text(flag_default("lora_targets")))
      ("base-storage", "ferry's LoRA base: compute (bf16) or fp8 (e4m3, a scale per output channel); the plain "
       "loop's is bf16", text(flag_default("base_storage")))
      ("base-home", "auto rows with LoRA: plan (the planner places the job), or host or nvme: every block's base "
       "there, streamed for each pass, its adapters updated by the CPU", text("plan"))
      ("h,help", "show this help");
  auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    return 0;
  }
  if (!args.unmatched().empty()) {
    throw Error(detail::concat("unexpected argument '", args.unmatched().front(), "': a flag takes its value after ",
                               "it (--steps 5), a true/false flag after '=' (--baseline=false); `ferry bench ",
                               "finetune --help` lists the flags"));
  }
  const std::string model_name = flag_text(args, "model");
  models::ModelConfig config = models::truncated(models::preset(model_name), setting_flag(args, "layers").get<std::int64_t>());
  const std::optional<DType> dtype = parse_dtype(flag_text(args, "dtype"));
  FERRY_CHECK(dtype == DType::kF32 || dtype == DType::kBF16, "--dtype ", flag_text(args, "dtype"),
              " is invalid: give F32 or BF16");
  config.dtype = *dtype;
  // No adapter dropout: the plain loop's forward runs none (LayeredModel::forward).
  Json lora = {{"lora_dropout", 0.0}};
  for (const char* key : {"lora_rank", "lora_alpha", "lora_targets"}) lora[key] = setting_flag(args, key);
  config.lora = job_lora(lora);
  config.validate();  // refuses unknown LoRA targets, naming the valid ones
  const std::int64_t keep_graph_flag = integer_flag(args, "keep-graph", -1);
  const std::int64_t keep_graph = keep_graph_flag < 0 ? config.num_layers : keep_graph_flag;
  const torch::Device device = torch::cuda::is_available() ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
  const std::int64_t seq = setting_flag(args, "seq").get<std::int64_t>();
  const int warmup = static_cast<int>(integer_flag(args, "warmup", 0, INT_MAX));
  const int steps = static_cast<int>(integer_flag(args, "steps", 1, INT_MAX));
  const bool baseline = boolean_flag(args, "baseline");
  const bool delayed_update = boolean_flag(args, "delayed-update");
  std::vector<Mode> modes;
  for (const std::string& mode : args["modes"].as<std::vector<std::string>>()) {
    modes.push_back(parse_flag("modes", mode, parse_mode));
  }
  std::vector<std::int64_t> batches;
  for (const std::string& batch : args["batches"].as<std::vector<std::string>>()) {
    batches.push_back(parse_integer(batch, "--batches", 1, INT64_MAX));
  }
  OffloadSettings offload;
  offload.gpu_budget = parse_bytes(setting_flag(args, "gpu_budget").get<std::string>());
  offload.host_budget = parse_bytes(setting_flag(args, "host_budget").get<std::string>());
  for (const std::string& dir : args["nvme"].as<std::vector<std::string>>()) {
    if (!dir.empty()) offload.nvme.push_back(dir);
  }
  offload.activations = flag_text(args, "activations");
  offload.fuyou.host_blocks = integer_flag(args, "fuyou-host-blocks", 0);
  offload.fuyou.blocks_in_flight = setting_flag(args, "fuyou_window").get<std::int64_t>();
  offload.grad_accumulation = setting_flag(args, "grad_accum").get<std::int64_t>();
  offload.order = parse_flag("micro-batch-order", flag_text(args, "micro-batch-order"), parse_micro_batch_order);
  offload.trace_blocks = args.count("trace-blocks") > 0;
  offload.profile = boolean_flag(args, "profile");
  offload.full = models::preset(model_name);
  offload.full->dtype = config.dtype;
  offload.full->lora = config.lora;
  offload.base_storage = parse_flag("base-storage", flag_text(args, "base-storage"), parse_base_storage);
  FERRY_CHECK(config.lora.enabled() || offload.base_storage == BaseStorage::kCompute, "--base-storage ",
              to_string(offload.base_storage), " stores a LoRA base: give --lora-rank too");
  const std::string base_home = flag_text(args, "base-home");
  FERRY_CHECK(base_home == "plan" || base_home == "host" || base_home == "nvme", "--base-home ", base_home,
              " is invalid: give plan, host or nvme");
  if (base_home != "plan") {
    FERRY_CHECK(config.lora.enabled(), "--base-home ", base_home, " streams a LoRA base: give --lora-rank too");
    FERRY_CHECK(base_home == "host" || !offload.nvme.empty(), "--base-home nvme needs --nvme directories");
    offload.base_home = parse_tier(base_home);
  }
  const bool plans = std::find(modes.begin(), modes.end(), Mode::kAuto) != modes.end() && !offload.base_home;
  if (plans) {
    const std::string file = flag_text(args, "calibration");
    if (!file.empty()) {
      offload.hardware = fs::exists(file) ? Hardware::load(file) : hardware_preset(file);
    } else {
      CalibrationOptions quick;
      quick.nvme_directories = offload.nvme;
      quick.nvme_bytes = std::uint64_t{64} << 20;
      quick.repeat = 1;
      quick.quick = true;
      offload.hardware = calibrate(quick);
    }
  }
  // The NVMe figures the fuyou rows' lower bound divides by, and the PCIe figures the streaming
  // LoRA rows' divides by (pinned copies of 1 GiB), measured here and now.
  const bool streams_lora = config.lora.enabled() &&
                            std::any_of(modes.begin(), modes.end(), [](Mode mode) { return mode != Mode::kGpu; });
  std::optional<NvmeFigures> nvme;
  std::optional<Hardware> pcie;
  if (!offload.nvme.empty() || streams_lora) {
    CalibrationOptions calibration;
    calibration.nvme_directories = offload.nvme;
    calibration.nvme_bytes = std::uint64_t{2} << 30;
    calibration.repeat = 1;
    const Hardware measured = calibrate(calibration);
    if (!offload.nvme.empty()) {
      nvme = NvmeFigures{"", measured.nvme_read_gbps(), measured.nvme_write_gbps()};
      std::printf("NVMe measured: read %.2f GB/s, write %.2f GB/s (io_uring, 2 GiB)\n", nvme->read_gbps,
                  nvme->write_gbps);
    }
    if (streams_lora) {
      pcie = measured;
      std::printf("PCIe measured: up %.2f GB/s, down %.2f GB/s (%s)\n", pcie->pcie_h2d_gbps, pcie->pcie_d2h_gbps,
                  pcie->gpu_is_host ? "no CUDA device: host memory copies" : "pinned host memory, 1 GiB copies");
    }
  }
  std::printf("bench finetune: %s (%s parameters), sequence %lld, on %s, %s\n", model_name.c_str(),
              models::format_parameter_count(config.parameter_count()).c_str(), static_cast<long long>(seq),
              device.str().c_str(), probe_gpu_tier().description.c_str());
  if (config.lora.enabled()) {
    std::printf("LoRA rank %lld, alpha %g on %zu linears a block (%s adapter parameters), %s base; TFLOPS count "
                "4 x parameters x tokens / s\n",
                static_cast<long long>(config.lora.rank), config.lora.alpha, config.lora_targets().size(),
                models::format_parameter_count(config.lora_parameter_count() * config.num_layers).c_str(),
                to_string(offload.base_storage));
  }
  std::printf("| %-40s | %5s | %8s | %9s | %7s | %9s | %8s | %s\n", "run", "batch", "s/step",
              "tokens/s", "TFLOPS", "peak GPU", "vs plain", "notes");
  for (std::int64_t batch : batches) {
    std::optional<Figures> plain, gpu_mode;
    auto print = [&](const Figures& f) {
      std::string ratio = plain ? std::to_string(f.tokens_per_s / plain->tokens_per_s).substr(0, 4) + "x" : "";
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
      if (pcie && f.pcie_up_bytes + f.pcie_down_bytes > 0) {
        std::printf("|   PCIe per step: up %s, down %s", format_bytes(f.pcie_up_bytes).c_str(),
                    format_bytes(f.pcie_down_bytes).c_str());
        if (gpu_mode) {
          // Note: PCIe carries both directions at once, each at its own measured rate.
          const double up_seconds = static_cast<double>(f.pcie_up_bytes) / (pcie->pcie_h2d_gbps * 1e9);
          const double down_seconds = static_cast<double>(f.pcie_down_bytes) / (pcie->pcie_d2h_gbps * 1e9);
          const double bound = std::max({gpu_mode->seconds_per_step, up_seconds, down_seconds});
          std::printf("; bound max(compute %.3f s (the gpu row, keeps %lld graphs), up %.3f s, down %.3f s) = %.3f s; "
                      "step / bound = %.2fx",
                      gpu_mode->seconds_per_step, static_cast<long long>(keep_graph), up_seconds, down_seconds, bound,
                      f.seconds_per_step / bound);
        }
        std::printf("\n");
      }
      std::fflush(stdout);
    };
    if (baseline) {
      try {
        plain = run_plain_libtorch(config, device, batch, seq, warmup, steps);
        print(*plain);
      } catch (const std::exception& error) {
        std::printf("| %s | %lld | failed: %s\n", describe_run("plain LibTorch", config, BaseStorage::kCompute).c_str(),
                    static_cast<long long>(batch), error.what());
      }
    }
    for (Mode mode : modes) {
      try {
        Figures figures = run_ferry(config, mode, device, batch, seq, warmup, steps, keep_graph, offload);
        if (mode == Mode::kGpu) gpu_mode = figures;
        print(figures);
        if (mode == Mode::kZeroOffload && delayed_update) {
          OffloadSettings delayed = offload;
          delayed.delayed_update = true;
          print(run_ferry(config, mode, device, batch, seq, warmup, steps, keep_graph, delayed));
        }
      } catch (const std::exception& error) {
        std::printf("| ferry %s | %lld | failed: %s\n", to_string(mode), static_cast<long long>(batch), error.what());
      }
    }
  }
  return 0;
}

}  // namespace

FERRY_CLI_COMMAND("bench finetune", "tokens/s, TFLOPS and peak GPU memory of ferry's modes vs plain LibTorch", run_bench_finetune);

}  // namespace ferry::cli
