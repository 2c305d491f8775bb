// `ferry plan`: where a job's bytes live, whether it fits, and the predicted step, for a model
// that is never built (docs/plan.md).

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <cxxopts.hpp>
#include <fstream>
#include <iostream>
#include <sstream>

#include "cli/command.h"
#include "cli/job_options.h"
#include "ferry/check.h"
#include "ferry/fs.h"
#include "ferry/job.h"
#include "ferry/memory.h"
#include "ferry/plan.h"
#include "ferry/system.h"

namespace ferry::cli {
namespace {

// Hardware figures: --hardware (a calibration file or a preset), else --calibration, else
// ferry-calibration.json here, else a quick calibration; then the flags on top.
Hardware resolve_hardware(const cxxopts::ParseResult& args, const std::vector<std::string>& directories) {
  Hardware hw = args.count("calibration") && !args.count("hardware")
                    ? Hardware::load(args["calibration"].as<std::string>())
                    : job_hardware(args.count("hardware") ? args["hardware"].as<std::string>() : "", directories);
  auto figure = [&](const char* flag) { return parse_number(args[flag].as<std::string>(), std::string("--") + flag); };
  auto override_figure = [&](const char* flag, double* value) {
    if (args.count(flag)) *value = figure(flag);
  };
  override_figure("tflops-bf16", &hw.matmul_tflops_bf16);
  override_figure("tflops-fp16", &hw.matmul_tflops_fp16);
  override_figure("tflops-fp32", &hw.matmul_tflops_fp32);
  override_figure("gpu-memory-gbps", &hw.gpu_memory_gbps);
  override_figure("pcie-h2d-gbps", &hw.pcie_h2d_gbps);
  override_figure("pcie-d2h-gbps", &hw.pcie_d2h_gbps);
  override_figure("cpu-adam-params-per-s", &hw.cpu_adam_params_per_s);
  override_figure("link-gbps", &hw.link_gbps);
  if (args.count("gpu-memory")) hw.gpu_memory_bytes = parse_bytes(args["gpu-memory"].as<std::string>());
  if (args.count("host-memory")) hw.host_memory_bytes = parse_bytes(args["host-memory"].as<std::string>());
  // Aggregate NVMe figures are shared evenly by the directories they are given for.
  if (args.count("nvme-read-gbps") || args.count("nvme-write-gbps")) {
    std::vector<std::string> names = directories.empty() ? std::vector<std::string>{"nvme"} : directories;
    const double read = args.count("nvme-read-gbps") ? figure("nvme-read-gbps") : hw.nvme_read_gbps(directories);
    const double write = args.count("nvme-write-gbps") ? figure("nvme-write-gbps") : hw.nvme_write_gbps(directories);
    hw.nvme.clear();
    for (const std::string& name : names) {
      hw.nvme.push_back({name, read / static_cast<double>(names.size()), write / static_cast<double>(names.size())});
    }
  }
  return hw;
}

// --profile FILE: a run's profile.json.
MeasuredCompute read_profile(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  FERRY_CHECK(in.good(), "--profile ", file, ": cannot be read (", std::strerror(errno),
              "); give the profile.json a `ferry finetune` run in mode auto or fuyou wrote into its --out");
  std::ostringstream text;
  text << in.rdbuf();
  return measured_compute_from_json(text.str(), file);
}

int run_plan(int argc, char** argv) {
  cxxopts::Options options(argv[0], "Plan a fine-tuning job without building it: the bytes per tier, whether it fits "
                                    "its budgets (exit 3 when not, with fixes that were planned to fit), and the "
                                    "predicted step. It reads the same flags and job file as `ferry finetune`, with "
                                    "the same defaults, and gives the verdict finetune's check gives.");
  add_job_options(options);
  options.add_options("Plan")
      ("gpus", "data-parallel ranks, one GPU each (torchrun's world size): the plan is one rank's, its fp32 master "
       "and optimizer states a 1/N shard, its step with the collectives (needs --link-gbps)",
       cxxopts::value<std::string>()->default_value("1"))
      ("max-batch", "choose the micro-batch: the fastest power of two up to this that fits, in sequences (0: --batch)",
       cxxopts::value<std::string>()->default_value("0"))
      ("attention", "the attention kernel to plan: fused or materialized (default: fused for a GPU target, else what "
       "this build runs)", cxxopts::value<std::string>())
      ("calibration", "hardware figures from `ferry bench calibrate --out FILE` (the same as --hardware FILE)",
       cxxopts::value<std::string>())
      ("profile", "plan from this measured compute: the profile.json a `ferry finetune` run in auto or fuyou "
       "writes into its --out (every part's seconds and the CPU worker's update rate, at its batch and seq)",
       cxxopts::value<std::string>())
      ("json", "print the plan as JSON")
      ("simulate", "write the predicted step to this file as a Chrome trace", cxxopts::value<std::string>())
      ("h,help", "show this help");
  options.add_options("Hardware figures (override the calibration's)")
      ("tflops-bf16", "dense bf16 matmul, TFLOPS", cxxopts::value<std::string>())
      ("tflops-fp16", "dense fp16 matmul, TFLOPS", cxxopts::value<std::string>())
      ("tflops-fp32", "dense fp32 matmul, TFLOPS", cxxopts::value<std::string>())
      ("gpu-memory", "GPU memory, bytes or a size such as 80GiB", cxxopts::value<std::string>())
      ("gpu-memory-gbps", "GPU memory bandwidth, GB/s", cxxopts::value<std::string>())
      ("pcie-h2d-gbps", "host-to-device copies, GB/s", cxxopts::value<std::string>())
      ("pcie-d2h-gbps", "device-to-host copies, GB/s", cxxopts::value<std::string>())
      ("nvme-read-gbps", "NVMe reads over all directories, GB/s", cxxopts::value<std::string>())
      ("nvme-write-gbps", "NVMe writes over all directories, GB/s", cxxopts::value<std::string>())
      ("cpu-adam-params-per-s", "CPU AdamW, parameters per second", cxxopts::value<std::string>())
      ("link-gbps", "the ranks' collectives: reduce-scatter bus bandwidth between their GPUs (nccl-tests' busbw), GB/s",
       cxxopts::value<std::string>())
      ("host-memory", "host memory, bytes or a size such as 512GiB", cxxopts::value<std::string>());
  options.allow_unrecognised_options();
  auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << job_help(options, {"Plan", "Hardware figures (override the calibration's)"}) << "\n";
    return 0;
  }

  const nlohmann::json job = resolve_job(args, "plan");
  const models::ModelConfig shape = model_shape(job);
  const EngineConfig config = engine_config(job, shape.num_layers);
  Hardware hardware = resolve_hardware(args, config.nvme_directories);
  std::optional<MeasuredCompute> measured;
  if (args.count("profile")) measured = read_profile(args["profile"].as<std::string>());
  PlanRequest request = plan_request(job, config, shape, std::move(measured), std::move(hardware));
  request.max_batch = parse_integer(args["max-batch"].as<std::string>(), "--max-batch", 0, 1 << 20);
  request.world_size = static_cast<int>(parse_integer(args["gpus"].as<std::string>(), "--gpus", 1, 1 << 16));
  FERRY_CHECK(request.world_size == 1 || request.engine.mode == Mode::kZo2 || request.hardware.link_gbps > 0,
              "--gpus ", request.world_size, " plans the ranks' collectives, but the hardware figures ('",
              request.hardware.name, "') have no link bandwidth: give --link-gbps (the bus bandwidth nccl-tests' ",
              "reduce_scatter_perf reports between the GPUs) or link_gbps in the hardware file");
  // Note: a GPU target runs a CUDA build of ferry, which is LibTorch 2's (docs/gpu-machine.md), so
  // it has SDPA's fused kernels even when this build, planning for it, has not. "auto" precision
  // is the target's: bf16 on a GPU.
  if (args.count("attention")) {
    request.attention = parse_attention_kernel(args["attention"].as<std::string>());
  } else if (!request.hardware.gpu_is_host) {
    request.attention = AttentionKernel::kFused;
  }
  if (job["precision"] == "auto") {
    request.engine.precision = preferred_precision(request.hardware);
  }

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
