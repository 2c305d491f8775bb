// `ferry bench zo`: zeroth-order training throughput and peak GPU memory of the zo2 mode with the
// blocks streamed from host memory or NVMe (some of them resident, their transfers compressed),
// against the same code with every weight resident on the GPU (MeZO's setting), measured in the
// same run.

#include <chrono>
#include <cstdio>
#include <cxxopts.hpp>
#include <iostream>
#include <optional>
#include <vector>

#include <torch/torch.h>

#include "cli/command.h"
#include "cli/job_options.h"
#include "ferry/check.h"
#include "ferry/engine.h"
#include "ferry/job.h"
#include "ferry/memory.h"
#include "ferry/model.h"
#include "ferry/plan.h"
#include "ferry/system.h"
#include "ferry/zo.h"

namespace ferry::cli {
namespace {

using Clock = std::chrono::steady_clock;

// Note: a throughput benchmark does not need distinct blocks, and a 66B model does not fit in
// host memory twice. Every block starts from the first block's weights: the model costs one
// block until the engine copies it into its bundles, where each block then has its own copy.
LayeredModel build_with_shared_blocks(const models::ModelConfig& config) {
  models::ModelConfig one_block = config;
  one_block.num_layers = 1;
  LayeredModel seed_model = models::build(one_block, 1);
  std::vector<std::shared_ptr<Block>> blocks = seed_model.blocks();
  const std::vector<torch::Tensor> first = blocks.front()->parameters();
  torch::NoGradGuard no_grad;
  for (std::int64_t i = 1; i < config.num_layers; ++i) {
    std::shared_ptr<Block> block = models::make_block(config, 0);
    std::vector<torch::Tensor> own = block->parameters();
    for (std::size_t j = 0; j < own.size(); ++j) own[j].set_data(first[j]);
    blocks.push_back(block);
  }
  return LayeredModel(seed_model.stem(), blocks, seed_model.head(), seed_model.context_options(),
                      causal_lm_loss, config);
}

struct Placement {
  std::string name;  // "gpu", "host", "nvme", "split:N", "host+gpu:N", "host+gpu:auto"
  Tier tier = Tier::kGpu;
  std::int64_t host_blocks = 0;
  std::int64_t gpu_blocks = 0;
};

std::int64_t parse_count(const std::string& text, const std::string& placement) {
  return parse_integer(text, "--placements " + placement + ": the block count", 0, 1 << 20);
}

Placement parse_placement(const std::string& text) {
  if (text.rfind("split:", 0) == 0) return {text, Tier::kNvme, parse_count(text.substr(6), text), 0};
  if (text.rfind("host+gpu:", 0) == 0) {
    const std::string count = text.substr(9);
    return {text, Tier::kHost, 0, count == "auto" ? ZoConfig::kAutoGpuBlocks : parse_count(count, text)};
  }
  return {text, parse_tier(text), 0, 0};
}

// The host half of a compressed transfer (the update of the stored fp32 copy and the encoding),
// timed on one block of the model with one thread per core. When the whole model's time exceeds
// the upload time the rows below show (busy s/step), compression makes the step CPU-bound.
void print_encode_rate(const std::string& model, const models::ModelConfig& config, ZoTransfer transfer,
                       int repeats) {
  const std::int64_t numel = config.block_parameter_count();
  std::vector<float> weights(static_cast<std::size_t>(numel), 0.01f);
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(numel) * 2);
  const std::vector<std::int64_t> ends = {numel};
  float scale = 0;
  optim::ZoTransferCopy copy{transfer == ZoTransfer::kBF16 ? optim::ZoTransferFormat::kBF16
                                                           : optim::ZoTransferFormat::kFp8E4M3,
                             codes.data(), &scale, ends.data(), 1, numel};
  optim::ZoTensors stored;
  stored.weights = weights.data();
  stored.numel = numel;
  const optim::ZoUpdate update = optim::zo_sgd_update(1e-7f, 1, 1.0f);
  optim::zo_update_and_encode(stored, &update, 1, copy);  // first touch
  const auto start = Clock::now();
  for (int i = 0; i < repeats; ++i) optim::zo_update_and_encode(stored, &update, 1, copy);
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count() / repeats;
  const double rate = static_cast<double>(numel) / seconds;
  const int threads = optim::num_threads();
  std::printf("%s: host update + %s encode (sgd): %.0f M elements/s on %d threads, %.1f M/s per thread; "
              "%.3f s per block, %.2f s per step for all %lld blocks\n",
              model.c_str(), to_string(transfer), rate / 1e6, threads, rate / 1e6 / threads, seconds,
              seconds * static_cast<double>(config.num_layers), static_cast<long long>(config.num_layers));
}

std::string transfer_summary(const StoreStats& stats, int steps) {
  std::string text;
  const Tier pairs[][2] = {{Tier::kHost, Tier::kGpu}, {Tier::kGpu, Tier::kHost},
                           {Tier::kNvme, Tier::kHost}, {Tier::kHost, Tier::kNvme}};
  for (const auto& pair : pairs) {
    const TransferStats& t = stats.transfers[static_cast<int>(pair[0])][static_cast<int>(pair[1])];
    if (t.bytes == 0) continue;
    char line[160];
    std::snprintf(line, sizeof line, "%s%s->%s %s/step, busy %.2f s/step (%.1f GB/s)",
                  text.empty() ? "" : "; ", to_string(pair[0]), to_string(pair[1]),
                  format_bytes(t.bytes / static_cast<std::uint64_t>(steps)).c_str(),
                  t.busy_seconds / steps, t.busy_seconds > 0 ? t.bytes / t.busy_seconds / 1e9 : 0.0);
    text += line;
  }
  return text.empty() ? "none" : text;
}

struct BenchShape {
  std::int64_t batch = 0;
  std::int64_t seq = 0;
  int warmup = 0;
  int steps = 0;
};

// With --hardware: the plan of the run as it ran (the engine's resolved settings), and of the
// whole preset when --layers cut it, with the same settings.
struct PlanCheck {
  Hardware hardware;
  std::optional<models::ModelConfig> full;
};

std::string planned(const models::ModelConfig& config, const EngineConfig& engine_config, const BenchShape& shape,
                    double measured_seconds, const PlanCheck& check) {
  PlanRequest request;
  request.model = config;
  request.engine = engine_config;
  request.batch = shape.batch;
  request.seq = shape.seq;
  request.hardware = check.hardware;
  const Plan plan = make_plan(request);
  char line[384];
  std::snprintf(line, sizeof line, "; plan predicts %.3f s, bottleneck %s (measured / predicted %.2f)",
                plan.step_seconds, to_string(plan.bottleneck), measured_seconds / plan.step_seconds);
  std::string text = line;
  if (check.full && check.full->num_layers > config.num_layers) {
    request.model = *check.full;
    const Plan whole = make_plan(request);
    std::snprintf(line, sizeof line,
                  "; the whole model (%lld blocks), these settings: %s, %.3f s/step, gpu %s, host %s, nvme %s, "
                  "bottleneck %s",
                  static_cast<long long>(check.full->num_layers), whole.fits ? "fits" : "does NOT fit",
                  whole.step_seconds, format_bytes(whole.tier_bytes[0]).c_str(),
                  format_bytes(whole.tier_bytes[1]).c_str(), format_bytes(whole.tier_bytes[2]).c_str(),
                  to_string(whole.bottleneck));
    text += line;
  }
  return text;
}

// One zo2 run of `model` placed and transferred as given: prints its table row. The all-GPU row
// sets `baseline`, which later rows are compared with.
void measure(const std::string& model, const models::ModelConfig& config, const Placement& placement,
             ZoTransfer transfer, const EngineConfig& base, const BenchShape& shape,
             const std::optional<PlanCheck>& check, std::optional<double>& baseline) {
  try {
    EngineConfig engine_config = base;
    engine_config.zo.block_tier = placement.tier;
    engine_config.zo.host_blocks = placement.host_blocks;
    engine_config.zo.gpu_blocks = placement.gpu_blocks;
    if (placement.tier == Tier::kGpu) {  // the baseline: MeZO's setting
      engine_config.gpu_budget_bytes = 0;
      engine_config.zo.storage.reset();
    }
    engine_config.zo.transfer = transfer;
    if (placement.tier != Tier::kNvme) engine_config.nvme_directories.clear();
    reset_gpu_peak_memory();
    const auto setup_start = Clock::now();
    Engine engine(build_with_shared_blocks(config), engine_config);
    const double setup = std::chrono::duration<double>(Clock::now() - setup_start).count();
    const data::Batch input = data::random_batch(shape.batch, shape.seq, config.vocab_size, 1);
    for (int i = 0; i < shape.warmup; ++i) engine.train_step(input);
    synchronize_gpu();
    const EngineStats before_steps = engine.stats();
    const StoreStats& before = before_steps.store;
    const auto start = Clock::now();
    for (int i = 0; i < shape.steps; ++i) engine.train_step(input);
    synchronize_gpu();
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count() / shape.steps;
    // Compressed, the last step's host work is still running: a flush waits for it (and moves
    // nothing across PCIe), so that all of it is counted.
    if (transfer != ZoTransfer::kStorage) engine.flush();
    const EngineStats after_steps = engine.stats();
    StoreStats during = after_steps.store;
    for (int a = 0; a < kTierCount; ++a) {
      for (int b = 0; b < kTierCount; ++b) {
        during.transfers[a][b].bytes -= before.transfers[a][b].bytes;
        during.transfers[a][b].busy_seconds -= before.transfers[a][b].busy_seconds;
      }
    }
    std::string placement_name = placement.name;
    if (placement.gpu_blocks == ZoConfig::kAutoGpuBlocks) {
      placement_name = "host+gpu:" + std::to_string(engine.config().zo.gpu_blocks);
    }
    std::string host_work;
    if (transfer != ZoTransfer::kStorage) {
      placement_name += std::string(", ") + to_string(transfer);
      char line[160];
      std::snprintf(line, sizeof line, "; host update+encode %.3f s/step, the sweep waited %.3f s/step for it",
                    (after_steps.optimizer_seconds - before_steps.optimizer_seconds) / shape.steps,
                    (after_steps.optimizer_wait_seconds - before_steps.optimizer_wait_seconds) / shape.steps);
      host_work = line;
    }
    if (check) host_work += planned(config, engine.config(), shape, seconds, *check);
    const double tokens_per_s = static_cast<double>(shape.batch * shape.seq) / seconds;
    if (placement.tier == Tier::kGpu) baseline = tokens_per_s;
    const std::string ratio = baseline && placement.tier != Tier::kGpu
                                  ? std::to_string(tokens_per_s / *baseline).substr(0, 5) + "x"
                                  : "";
    std::printf("| %-9s | %-18s | %8.3f | %9.0f | %9s | %8s | %s%s; set-up %.0f s\n", model.c_str(),
                placement_name.c_str(), seconds, tokens_per_s,
                format_bytes(gpu_memory_stats().peak_allocated_bytes).c_str(), ratio.c_str(),
                transfer_summary(during, shape.steps).c_str(), host_work.c_str(), setup);
  } catch (const std::exception& error) {
    std::printf("| %-9s | %-18s | failed: %s\n", model.c_str(), placement.name.c_str(), error.what());
  }
  std::fflush(stdout);
}

int run_bench_zo(int argc, char** argv) {
  cxxopts::Options options(argv[0], "Measure the zo2 mode against the same code with every weight on the GPU");
  options.add_options()
      ("models", "presets", cxxopts::value<std::vector<std::string>>()->default_value("opt-1.3b,opt-13b"))
      ("layers", "every preset's first N blocks only, every other dimension kept (0: all)",
       cxxopts::value<std::string>()->default_value("0"))
      ("hardware", "compare each row with the plan for these figures: a hardware preset or a file from `ferry "
       "bench calibrate` (and, with --layers, plan the whole preset)", cxxopts::value<std::string>()->default_value(""))
      ("placements", "gpu (the baseline), host, nvme, split:N (N blocks on host, the rest on NVMe) or "
       "host+gpu:N (N blocks resident on the GPU, spread evenly, the rest on host; N = auto: as many as "
       "--gpu-budget holds)",
       cxxopts::value<std::vector<std::string>>()->default_value("gpu,host"))
      ("gpu-budget", "the GPU budget of the streamed placements (0: none)",
       cxxopts::value<std::string>()->default_value("0"))
      ("transfers", "what crosses PCIe for streamed blocks: storage, bf16 or fp8 (one run each; bf16 "
       "and fp8 with --storage fp32 or, fp8 only, bf16)",
       cxxopts::value<std::vector<std::string>>()->default_value("storage"))
      ("storage", "zo storage precision (default: the compute precision)",
       cxxopts::value<std::string>()->default_value(""))
      ("nvme", "directory for NVMe-resident blocks", cxxopts::value<std::string>()->default_value(""))
      ("batch", "sequences per step", cxxopts::value<std::string>()->default_value("8"))
      ("seq", "tokens per sequence", cxxopts::value<std::string>()->default_value("512"))
      ("precision", "compute precision: fp32, bf16 or fp16", cxxopts::value<std::string>()->default_value("bf16"))
      ("window", "zo2 blocks on the device at once (2 or more)", cxxopts::value<std::string>()->default_value("3"))
      ("write-back", "a streamed block goes home every N steps (1 to 8)",
       cxxopts::value<std::string>()->default_value("4"))
      ("warmup", "untimed steps before the timed ones", cxxopts::value<std::string>()->default_value("2"))
      ("steps", "timed steps (1 or more)", cxxopts::value<std::string>()->default_value("5"))
      ("lora-rank", "ZO-LoRA: adapters of this rank over a frozen base, which streams read-only (0: train "
       "every parameter)", cxxopts::value<std::string>()->default_value(flag_default("lora_rank")))
      ("lora-alpha", "LoRA's alpha", cxxopts::value<std::string>()->default_value(flag_default("lora_alpha")))
      ("lora-targets", "the linears LoRA adapts: PEFT target_modules names, comma-separated, or all-linear",
       cxxopts::value<std::string>()->default_value(flag_default("lora_targets")))
      ("base-storage", "the LoRA base's storage: compute or fp8 (e4m3, a scale per output channel)",
       cxxopts::value<std::string>()->default_value(flag_default("base_storage")))
      ("h,help", "show this help");
  auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    return 0;
  }
  const torch::Device device = torch::cuda::is_available() ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
  auto integer = [&](const char* flag, std::int64_t low, std::int64_t high) {
    return parse_integer(args[flag].as<std::string>(), std::string("--") + flag, low, high);
  };
  const BenchShape shape{integer("batch", 1, 1 << 20), integer("seq", 1, 1 << 24),
                         static_cast<int>(integer("warmup", 0, 1000)), static_cast<int>(integer("steps", 1, 100000))};
  // LoRA's flags, read by `ferry finetune`'s rules; no adapter dropout.
  nlohmann::json lora_settings = {{"lora_dropout", 0.0}};
  for (const char* key : {"lora_rank", "lora_alpha", "lora_targets"}) {
    const std::string flag = flag_name(key);
    const std::string text = args[flag].as<std::string>();
    lora_settings[key] = read_job_setting(key, text, "--" + flag + " " + text);
  }
  const models::LoraConfig lora = job_lora(lora_settings);
  // What every run shares; measure() sets the placement and the transfer.
  EngineConfig base;
  base.mode = Mode::kZo2;
  base.precision = parse_precision(args["precision"].as<std::string>());
  base.device = device;
  base.optimizer.kind = OptimizerKind::kSgd;
  base.optimizer.lr = job_default_lr("zo2", "sgd", lora.enabled());
  base.base_storage = parse_base_storage(args["base-storage"].as<std::string>());
  FERRY_CHECK(lora.enabled() || base.base_storage == BaseStorage::kCompute, "--base-storage ",
              to_string(base.base_storage), " stores a LoRA base: give --lora-rank too");
  base.gpu_budget_bytes = parse_bytes(args["gpu-budget"].as<std::string>());
  base.zo.blocks_in_flight = integer("window", 2, 1024);
  base.zo.write_back_interval = integer("write-back", 1, optim::kMaxZoUpdates);
  const std::string storage = args["storage"].as<std::string>();
  if (!storage.empty()) base.zo.storage = parse_precision(storage);
  base.nvme_directories = {args["nvme"].as<std::string>()};
  std::printf("bench zo: batch %lld x sequence %lld, on %s, %s\n", static_cast<long long>(shape.batch),
              static_cast<long long>(shape.seq), device.str().c_str(), probe_gpu_tier().description.c_str());
  if (lora.enabled()) {
    std::string targets;
    for (const std::string& target : lora.targets) targets += (targets.empty() ? "" : ",") + target;
    std::printf("ZO-LoRA: rank %lld, alpha %g on %s, the base in %s, lr %g\n", static_cast<long long>(lora.rank),
                lora.alpha, targets.c_str(), to_string(base.base_storage), base.optimizer.lr);
  }
  std::printf("| %-9s | %-18s | %8s | %9s | %9s | %8s | %s\n", "model", "blocks on", "s/step",
              "tokens/s", "peak GPU", "vs gpu", "transfers");
  std::vector<ZoTransfer> transfers;
  for (const std::string& text : args["transfers"].as<std::vector<std::string>>()) {
    transfers.push_back(parse_zo_transfer(text));
  }
  const std::int64_t layers = integer("layers", 0, 1 << 20);
  const std::string hardware = args["hardware"].as<std::string>();
  for (const std::string& name : args["models"].as<std::vector<std::string>>()) {
    models::ModelConfig config = models::truncated(models::preset(name), layers);
    config.dtype = DType::kBF16;
    config.lora = lora;
    config.validate();  // refuses unknown LoRA targets, naming the valid ones
    std::optional<PlanCheck> check;
    if (!hardware.empty()) {
      check = PlanCheck{job_hardware(hardware, {}), models::preset(name)};
      check->full->dtype = config.dtype;
      check->full->lora = lora;
    }
    for (ZoTransfer transfer : transfers) {
      if (transfer != ZoTransfer::kStorage) print_encode_rate(name, config, transfer, 3);
    }
    std::optional<double> baseline;
    for (const std::string& placement_text : args["placements"].as<std::vector<std::string>>()) {
      const Placement placement = parse_placement(placement_text);
      for (ZoTransfer transfer : transfers) {
        if (placement.tier == Tier::kGpu && transfer != ZoTransfer::kStorage) continue;  // nothing crosses
        measure(name, config, placement, transfer, base, shape, check, baseline);
      }
    }
  }
  return 0;
}

}  // namespace

FERRY_CLI_COMMAND("bench zo", "zo2 mode throughput and peak GPU memory vs all weights on the GPU", run_bench_zo);

}  // namespace ferry::cli
