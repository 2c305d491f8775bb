// `ferry plan`: where a job's bytes live, whether it fits, and the predicted step, for a model
// that is never built (docs/plan.md).

#include <cstdio>
#include <cxxopts.hpp>
#include <fstream>
#include <iostream>
#include <sstream>

#include "cli/command.h"
#include "ferry/check.h"
#include "ferry/fs.h"
#include "ferry/memory.h"
#include "ferry/plan.h"
#include "ferry/system.h"

namespace ferry::cli {
namespace {

constexpr const char* kDefaultCalibration = "ferry-calibration.json";

models::ModelConfig resolve_model(const std::string& name) {
  if (name.find('/') == std::string::npos) return models::preset(name);
  FERRY_CHECK(fs::is_directory(name), "--model ", name,
              " is neither a preset nor a directory with a Hugging Face config.json");
  return models::ModelConfig::from_hf_file(name + "/config.json");
}

// With no calibration file: a quick calibration of this machine and its NVMe directories (about a
// second), said so on stderr. Where even that cannot run (a directory without O_DIRECT, say), the
// machine's figures without those directories, and NVMe at a stated default rate.
Hardware quick_calibration(const std::vector<std::string>& directories) {
  CalibrationOptions options;
  options.nvme_directories = directories;
  options.nvme_bytes = std::uint64_t{32} << 20;
  options.repeat = 1;
  options.quick = true;
  std::cerr << "ferry plan: no " << kDefaultCalibration << " here: planning with a quick calibration of this "
               "machine (rougher figures; `ferry bench calibrate` measures them properly)\n";
  try {
    return calibrate(options);
  } catch (const Error& error) {
    constexpr double kDefaultNvmeGbps = 1.0;
    std::cerr << "ferry plan: the NVMe directories could not be measured (" << error.what() << "): planning them at "
              << kDefaultNvmeGbps << " GB/s each way\n";
    options.nvme_directories.clear();
    Hardware hw = calibrate(options);
    for (const std::string& directory : directories) hw.nvme.push_back({directory, kDefaultNvmeGbps, kDefaultNvmeGbps});
    return hw;
  }
}

// Hardware figures: a preset (planning for another machine), else the calibration file, then the
// flags on top.
Hardware resolve_hardware(const cxxopts::ParseResult& args, const std::vector<std::string>& directories) {
  Hardware hw;
  if (args.count("hardware")) {
    hw = hardware_preset(args["hardware"].as<std::string>());
  } else {
    const std::string path = args.count("calibration") ? args["calibration"].as<std::string>() : kDefaultCalibration;
    hw = args.count("calibration") || fs::exists(path) ? Hardware::load(path) : quick_calibration(directories);
  }
  auto override_figure = [&](const char* flag, double* figure) {
    if (args.count(flag)) *figure = args[flag].as<double>();
  };
  override_figure("tflops-bf16", &hw.matmul_tflops_bf16);
  override_figure("tflops-fp16", &hw.matmul_tflops_fp16);
  override_figure("tflops-fp32", &hw.matmul_tflops_fp32);
  override_figure("gpu-memory-gbps", &hw.gpu_memory_gbps);
  override_figure("pcie-h2d-gbps", &hw.pcie_h2d_gbps);
  override_figure("pcie-d2h-gbps", &hw.pcie_d2h_gbps);
  override_figure("cpu-adam-params-per-s", &hw.cpu_adam_params_per_s);
  if (args.count("gpu-memory")) hw.gpu_memory_bytes = parse_bytes(args["gpu-memory"].as<std::string>());
  if (args.count("host-memory")) hw.host_memory_bytes = parse_bytes(args["host-memory"].as<std::string>());
  // Aggregate NVMe figures are shared evenly by the directories they are given for.
  if (args.count("nvme-read-gbps") || args.count("nvme-write-gbps")) {
    std::vector<std::string> names = directories.empty() ? std::vector<std::string>{"nvme"} : directories;
    const double read = args.count("nvme-read-gbps") ? args["nvme-read-gbps"].as<double>() : hw.nvme_read_gbps(directories);
    const double write = args.count("nvme-write-gbps") ? args["nvme-write-gbps"].as<double>() : hw.nvme_write_gbps(directories);
    hw.nvme.clear();
    for (const std::string& name : names) {
      hw.nvme.push_back({name, read / static_cast<double>(names.size()), write / static_cast<double>(names.size())});
    }
  }
  return hw;
}

// Planning for this machine, the NVMe directories must exist, and their free space bounds the
// NVMe tier unless a budget says less.
void check_directories(PlanRequest* request) {
  std::uint64_t free_bytes = 0;
  for (const std::string& directory : request->engine.nvme_directories) {
    const DiskTierInfo disk = probe_disk_tier(directory);
    FERRY_CHECK(disk.exists, "NVMe directory '", directory,
                "' does not exist: create it (mkdir -p) or pass another --nvme directory");
    free_bytes += disk.free_bytes;
  }
  if (!request->engine.nvme_directories.empty() &&
      (request->engine.nvme_budget_bytes == 0 || request->engine.nvme_budget_bytes > free_bytes)) {
    request->engine.nvme_budget_bytes = free_bytes;
  }
}

int run_plan(int argc, char** argv) {
  cxxopts::Options options(argv[0], "Plan a fine-tuning job: bytes per tier, fit, predicted step time");
  options.add_options()
      ("model", "preset or Hugging Face directory", cxxopts::value<std::string>()->default_value("llama-7b"))
      ("layers", "a preset's first N blocks only, every other dimension kept (0: all)",
       cxxopts::value<std::int64_t>()->default_value("0"))
      ("lora-rank", "LoRA adapters of this rank over a frozen base (0: train every parameter)",
       cxxopts::value<std::int64_t>()->default_value("0"))
      ("lora-targets", "the linears LoRA adapts: PEFT target_modules names, comma-separated, or all-linear",
       cxxopts::value<std::string>()->default_value("all-linear"))
      ("base-storage", "the LoRA base's storage: compute (the precision) or fp8 (e4m3, a scale per output channel)",
       cxxopts::value<std::string>()->default_value("compute"))
      ("mode", "gpu, zero-offload, fuyou, auto (the planner places every part by the budgets) or zo2",
       cxxopts::value<std::string>()->default_value("zero-offload"))
      ("precision", "fp32, bf16 or fp16", cxxopts::value<std::string>()->default_value("bf16"))
      ("batch", "sequences per micro-batch", cxxopts::value<std::int64_t>()->default_value("8"))
      ("seq", "sequence length", cxxopts::value<std::int64_t>()->default_value("1024"))
      ("grad-accum", "micro-batches per step", cxxopts::value<std::int64_t>()->default_value("1"))
      ("micro-batch-order", "with --grad-accum > 1: batch-major, layer-major (each block once per step), "
       "or auto: the faster that fits", cxxopts::value<std::string>()->default_value("auto"))
      ("gpu-budget", "GPU tier budget (0: the GPU's memory)", cxxopts::value<std::string>()->default_value("0"))
      ("host-budget", "host tier budget (0: the host's memory)", cxxopts::value<std::string>()->default_value("0"))
      ("nvme-budget", "NVMe tier budget (0: the directories' free space)", cxxopts::value<std::string>()->default_value("0"))
      ("nvme", "NVMe directories, comma-separated", cxxopts::value<std::vector<std::string>>())
      ("optimizer", "adamw, adam, sgd or adagrad", cxxopts::value<std::string>()->default_value("adamw"))
      ("momentum", "sgd momentum (a state per parameter when > 0)", cxxopts::value<double>()->default_value("0"))
      ("max-grad-norm", "global-norm clipping (0: off); on, updates wait for backward", cxxopts::value<double>()->default_value("0"))
      ("max-batch", "choose the micro-batch: the fastest power of two up to this that fits (0: --batch)",
       cxxopts::value<std::int64_t>()->default_value("0"))
      ("keep-graph-blocks", "gpu/zero-offload: blocks that keep their graph", cxxopts::value<std::int64_t>()->default_value("0"))
      ("offload-checkpoints", "gpu/zero-offload: checkpoints in host memory")
      ("activations", "per block, comma-separated: gpu, host, nvme (a checkpoint's tier) or graph; "
       "auto: fuyou chooses", cxxopts::value<std::string>()->default_value("auto"))
      ("fuyou-host-blocks", "fuyou: blocks whose parameters live in host memory (default: what the host budget leaves)",
       cxxopts::value<std::int64_t>())
      ("fuyou-window", "fuyou: blocks on the device at once", cxxopts::value<std::int64_t>()->default_value("3"))
      ("zo-samples", "zo2: perturbations per step", cxxopts::value<std::int64_t>()->default_value("1"))
      ("zo-block-tier", "zo2: where blocks live, host or nvme", cxxopts::value<std::string>()->default_value("host"))
      ("zo-host-blocks", "zo2 with nvme: blocks kept in host memory", cxxopts::value<std::int64_t>()->default_value("0"))
      ("zo-blocks-in-flight", "zo2: blocks on the device at once", cxxopts::value<std::int64_t>()->default_value("3"))
      ("zo-gpu-blocks", "zo2: blocks resident on the device (spread evenly), a number or auto (the most the gpu "
       "budget holds)", cxxopts::value<std::string>()->default_value("0"))
      ("zo-write-back", "zo2: a streamed block goes home every this many steps (1 to 8)",
       cxxopts::value<std::int64_t>()->default_value("4"))
      ("attention", "fused or materialized (default: fused for a GPU, else what this build runs)", cxxopts::value<std::string>())
      ("hardware", "plan for a named machine instead of this one", cxxopts::value<std::string>())
      ("calibration", "hardware figures from `ferry bench calibrate` (default: ferry-calibration.json if present, else a "
       "quick calibration of this machine)", cxxopts::value<std::string>())
      ("tflops-bf16", "dense bf16 matmul TFLOPS", cxxopts::value<double>())
      ("tflops-fp16", "dense fp16 matmul TFLOPS", cxxopts::value<double>())
      ("tflops-fp32", "dense fp32 matmul TFLOPS", cxxopts::value<double>())
      ("gpu-memory", "GPU memory", cxxopts::value<std::string>())
      ("gpu-memory-gbps", "GPU memory bandwidth, GB/s", cxxopts::value<double>())
      ("pcie-h2d-gbps", "host-to-device GB/s", cxxopts::value<double>())
      ("pcie-d2h-gbps", "device-to-host GB/s", cxxopts::value<double>())
      ("nvme-read-gbps", "NVMe read GB/s over all directories", cxxopts::value<double>())
      ("nvme-write-gbps", "NVMe write GB/s over all directories", cxxopts::value<double>())
      ("cpu-adam-params-per-s", "CPU AdamW parameters per second", cxxopts::value<double>())
      ("host-memory", "host memory", cxxopts::value<std::string>())
      ("json", "print the plan as JSON")
      ("simulate", "write the predicted step as a Chrome trace", cxxopts::value<std::string>())
      ("h,help", "show this help");
  auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    return 0;
  }

  PlanRequest request;
  request.model_name = args["model"].as<std::string>();
  request.model = resolve_model(request.model_name);
  if (args["layers"].as<std::int64_t>() != 0) {
    FERRY_CHECK(request.model_name.find('/') == std::string::npos, "--layers truncates a preset; ",
                request.model_name, " is a Hugging Face directory");
    request.model = models::truncated(request.model, args["layers"].as<std::int64_t>());
  }
  request.model.lora.rank = args["lora-rank"].as<std::int64_t>();
  request.model.lora.targets.clear();
  std::stringstream targets(args["lora-targets"].as<std::string>());
  for (std::string name; std::getline(targets, name, ',');) {
    if (!name.empty()) request.model.lora.targets.push_back(name);
  }
  request.model.validate();
  request.batch = args["batch"].as<std::int64_t>();
  request.seq = args["seq"].as<std::int64_t>();
  EngineConfig& config = request.engine;
  config.mode = parse_mode(args["mode"].as<std::string>());
  config.precision = parse_precision(args["precision"].as<std::string>());
  config.base_storage = parse_base_storage(args["base-storage"].as<std::string>());
  config.gpu_budget_bytes = parse_bytes(args["gpu-budget"].as<std::string>());
  config.host_budget_bytes = parse_bytes(args["host-budget"].as<std::string>());
  config.nvme_budget_bytes = parse_bytes(args["nvme-budget"].as<std::string>());
  if (args.count("nvme")) config.nvme_directories = args["nvme"].as<std::vector<std::string>>();
  config.optimizer.kind = parse_optimizer(args["optimizer"].as<std::string>());
  config.optimizer.momentum = args["momentum"].as<double>();
  config.grad_accumulation = args["grad-accum"].as<std::int64_t>();
  const std::string order = args["micro-batch-order"].as<std::string>();
  FERRY_CHECK(order == "auto" || order == "batch-major" || order == "layer-major", "--micro-batch-order ", order,
              " is invalid: use auto, batch-major or layer-major");
  request.choose_micro_batch_order = order == "auto";
  if (!request.choose_micro_batch_order) config.micro_batch_order = parse_micro_batch_order(order);
  config.max_grad_norm = args["max-grad-norm"].as<double>();
  config.keep_graph_blocks = args["keep-graph-blocks"].as<std::int64_t>();
  config.offload_checkpoints = args.count("offload-checkpoints") > 0;
  config.zo.samples = args["zo-samples"].as<std::int64_t>();
  config.zo.block_tier = args["zo-block-tier"].as<std::string>() == "nvme" ? Tier::kNvme : Tier::kHost;
  FERRY_CHECK(args["zo-block-tier"].as<std::string>() == "nvme" || args["zo-block-tier"].as<std::string>() == "host",
              "--zo-block-tier ", args["zo-block-tier"].as<std::string>(), " is invalid: use host or nvme");
  config.zo.host_blocks = args["zo-host-blocks"].as<std::int64_t>();
  config.zo.blocks_in_flight = args["zo-blocks-in-flight"].as<std::int64_t>();
  const std::string gpu_blocks = args["zo-gpu-blocks"].as<std::string>();
  FERRY_CHECK(gpu_blocks == "auto" ||
                  (!gpu_blocks.empty() && gpu_blocks.find_first_not_of("0123456789") == std::string::npos),
              "--zo-gpu-blocks ", gpu_blocks, " is invalid: use auto or a number of blocks");
  config.zo.gpu_blocks = gpu_blocks == "auto" ? ZoConfig::kAutoGpuBlocks : std::stoll(gpu_blocks);
  config.zo.write_back_interval = args["zo-write-back"].as<std::int64_t>();
  request.max_batch = args["max-batch"].as<std::int64_t>();
  const std::string activations = args["activations"].as<std::string>();
  request.choose_activations = activations == "auto";
  if (!request.choose_activations) config.placement.activations = parse_activations(activations, request.model.num_layers);
  request.choose_host_blocks = args.count("fuyou-host-blocks") == 0;
  if (!request.choose_host_blocks) config.fuyou.host_blocks = args["fuyou-host-blocks"].as<std::int64_t>();
  config.fuyou.blocks_in_flight = args["fuyou-window"].as<std::int64_t>();
  request.hardware = resolve_hardware(args, config.nvme_directories);
  // Note: a GPU target runs a CUDA build of ferry, which is LibTorch 2's (docs/gpu-machine.md), so
  // it has SDPA's fused kernels even when this build, planning for it, has not.
  if (args.count("attention")) {
    request.attention = parse_attention_kernel(args["attention"].as<std::string>());
  } else if (!request.hardware.gpu_is_host) {
    request.attention = AttentionKernel::kFused;
  }
  if (!args.count("hardware")) check_directories(&request);

  const Plan plan = make_plan(request);
  if (args.count("json")) {
    std::cout << plan_to_json(plan);
  } else {
    std::cout << format_plan(plan);
  }
  if (args.count("simulate")) {
    write_plan_trace(plan, args["simulate"].as<std::string>());
    std::cerr << "predicted step written to " << args["simulate"].as<std::string>()
              << " (chrome://tracing or ui.perfetto.dev)\n";
  }
  return plan.fits ? 0 : 3;
}

}  // namespace

FERRY_CLI_COMMAND("plan", "bytes per tier, fit and predicted step time of a job, without building it", run_plan);

}  // namespace ferry::cli
