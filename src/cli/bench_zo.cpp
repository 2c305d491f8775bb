// `ferry bench zo`: zeroth-order training throughput and peak GPU memory of the zo2 mode with the
// blocks streamed from host memory or NVMe, against the same code with every weight resident on
// the GPU (MeZO's setting), measured in the same run.

#include <chrono>
#include <cstdio>
#include <cxxopts.hpp>
#include <iostream>
#include <optional>

#include <torch/torch.h>

#include "cli/command.h"
#include "ferry/engine.h"
#include "ferry/memory.h"
#include "ferry/model.h"
#include "ferry/system.h"

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
    std::shared_ptr<Block> block = models::make_block(config);
    std::vector<torch::Tensor> own = block->parameters();
    for (std::size_t j = 0; j < own.size(); ++j) own[j].set_data(first[j]);
    blocks.push_back(block);
  }
  return LayeredModel(seed_model.stem(), blocks, seed_model.head(), seed_model.context_options(),
                      causal_lm_loss, config);
}

struct Placement {
  std::string name;  // "gpu", "host", "nvme", "split:N"
  Tier tier = Tier::kGpu;
  std::int64_t host_blocks = 0;
};

Placement parse_placement(const std::string& text) {
  if (text.rfind("split:", 0) == 0) return {text, Tier::kNvme, std::stoll(text.substr(6))};
  return {text, parse_tier(text), 0};
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

int run_bench_zo(int argc, char** argv) {
  cxxopts::Options options(argv[0], "Measure the zo2 mode against the same code with every weight on the GPU");
  options.add_options()
      ("models", "presets", cxxopts::value<std::vector<std::string>>()->default_value("opt-1.3b,opt-13b"))
      ("placements", "gpu (the baseline), host, nvme or split:N (N blocks on host, the rest on NVMe)",
       cxxopts::value<std::vector<std::string>>()->default_value("gpu,host"))
      ("nvme", "directory for NVMe-resident blocks", cxxopts::value<std::string>()->default_value(""))
      ("batch", "batch size", cxxopts::value<std::int64_t>()->default_value("8"))
      ("seq", "sequence length", cxxopts::value<std::int64_t>()->default_value("512"))
      ("precision", "compute precision", cxxopts::value<std::string>()->default_value("bf16"))
      ("window", "zo blocks in flight", cxxopts::value<std::int64_t>()->default_value("3"))
      ("write-back", "zo write-back interval", cxxopts::value<std::int64_t>()->default_value("4"))
      ("warmup", "untimed steps", cxxopts::value<int>()->default_value("2"))
      ("steps", "timed steps", cxxopts::value<int>()->default_value("5"))
      ("h,help", "show this help");
  auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    return 0;
  }
  const torch::Device device = torch::cuda::is_available() ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
  const std::int64_t batch = args["batch"].as<std::int64_t>();
  const std::int64_t seq = args["seq"].as<std::int64_t>();
  const int warmup = args["warmup"].as<int>();
  const int steps = args["steps"].as<int>();
  std::printf("bench zo: batch %lld x sequence %lld, on %s, %s\n", static_cast<long long>(batch),
              static_cast<long long>(seq), device.str().c_str(), probe_gpu_tier().description.c_str());
  std::printf("| %-9s | %-18s | %8s | %9s | %9s | %8s | %s\n", "model", "blocks on", "s/step",
              "tokens/s", "peak GPU", "vs gpu", "transfers");
  for (const std::string& name : args["models"].as<std::vector<std::string>>()) {
    models::ModelConfig config = models::preset(name);
    config.dtype = DType::kBF16;
    std::optional<double> baseline;
    for (const std::string& placement_text : args["placements"].as<std::vector<std::string>>()) {
      const Placement placement = parse_placement(placement_text);
      try {
        EngineConfig engine_config;
        engine_config.mode = Mode::kZo2;
        engine_config.precision = parse_precision(args["precision"].as<std::string>());
        engine_config.device = device;
        engine_config.optimizer.kind = OptimizerKind::kSgd;
        engine_config.optimizer.lr = 1e-7;
        engine_config.zo.block_tier = placement.tier;
        engine_config.zo.host_blocks = placement.host_blocks;
        engine_config.zo.blocks_in_flight = args["window"].as<std::int64_t>();
        engine_config.zo.write_back_interval = args["write-back"].as<std::int64_t>();
        if (placement.tier == Tier::kNvme) engine_config.nvme_directories = {args["nvme"].as<std::string>()};
        reset_gpu_peak_memory();
        const auto setup_start = Clock::now();
        Engine engine(build_with_shared_blocks(config), engine_config);
        const double setup = std::chrono::duration<double>(Clock::now() - setup_start).count();
        const data::Batch input = data::random_batch(batch, seq, config.vocab_size, 1);
        for (int i = 0; i < warmup; ++i) engine.train_step(input);
        synchronize_gpu();
        const StoreStats before = engine.stats().store;
        const auto start = Clock::now();
        for (int i = 0; i < steps; ++i) engine.train_step(input);
        synchronize_gpu();
        const double seconds = std::chrono::duration<double>(Clock::now() - start).count() / steps;
        StoreStats during = engine.stats().store;
        for (int a = 0; a < kTierCount; ++a) {
          for (int b = 0; b < kTierCount; ++b) {
            during.transfers[a][b].bytes -= before.transfers[a][b].bytes;
            during.transfers[a][b].busy_seconds -= before.transfers[a][b].busy_seconds;
          }
        }
        const double tokens_per_s = static_cast<double>(batch * seq) / seconds;
        if (placement.tier == Tier::kGpu) baseline = tokens_per_s;
        const std::string ratio = baseline && placement.tier != Tier::kGpu
                                      ? std::to_string(tokens_per_s / *baseline).substr(0, 5) + "x"
                                      : "";
        std::printf("| %-9s | %-18s | %8.3f | %9.0f | %9s | %8s | %s; set-up %.0f s\n", name.c_str(),
                    placement.name.c_str(), seconds, tokens_per_s,
                    format_bytes(gpu_memory_stats().peak_allocated_bytes).c_str(), ratio.c_str(),
                    transfer_summary(during, steps).c_str(), setup);
      } catch (const std::exception& error) {
        std::printf("| %-9s | %-18s | failed: %s\n", name.c_str(), placement.name.c_str(), error.what());
      }
      std::fflush(stdout);
    }
  }
  return 0;
}

}  // namespace

FERRY_CLI_COMMAND("bench zo", "zo2 mode throughput and peak GPU memory vs all weights on the GPU", run_bench_zo);

}  // namespace ferry::cli
