#pragma once

// The planner (docs/architecture.md, layer 7): where every byte of a fine-tuning job lives and how long a
// step takes, for a model that is never built, on hardware described by figures. It sizes the
// tiers with the engine's own sizing (engine_demand), adds the activations, checks the budgets
// and, when they do not hold, names the smallest changes that would make the job fit. The step
// time comes from replaying one step's schedule, block by block, on six resources: GPU compute,
// PCIe up, PCIe down, NVMe read, NVMe write, the CPU optimizer and, with several ranks, their
// collectives. See docs/plan.md.
//
//   ferry::PlanRequest request;
//   request.model = ferry::models::preset("gpt3-175b");
//   request.engine.mode = ferry::Mode::kFuyou;
//   request.hardware = ferry::hardware_preset("rtx4090-fuyou");
//   ...
//   ferry::Plan plan = ferry::make_plan(request);
//   std::cout << ferry::format_plan(plan);

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "ferry/engine.h"
#include "ferry/model_config.h"

namespace ferry {

// --- hardware figures -------------------------------------------------------------------------

struct NvmeFigures {
  std::string directory;
  double read_gbps = 0;   // GB/s (1e9 bytes) through ferry's I/O engine
  double write_gbps = 0;
  // The I/O engine's settings that reached these figures, the fastest calibration tried (0: the
  // engine's defaults). The front ends run the store's NVMe tier with them (nvme_io_for).
  unsigned queue_depth = 0;
  std::uint64_t block_bytes = 0;
};

// The I/O settings calibration measured fastest for the first of `directories` (the store runs
// one I/O engine over all its stripes), or none.
struct NvmeIoSettings {
  unsigned queue_depth = 0;  // 0: the engine's default
  std::uint64_t block_bytes = 0;
};

// What the cost model knows of a machine: achievable rates, measured by `ferry bench calibrate`
// or taken from a preset or flags, never datasheet peaks unless a preset says so.
struct Hardware {
  std::string name;
  // No CUDA device: the "GPU" tier is host memory, "PCIe" is a host memcpy and the matmul
  // figures are the CPU's.
  bool gpu_is_host = false;
  std::uint64_t gpu_memory_bytes = 0;
  double gpu_memory_gbps = 0;  // device memory bandwidth: elementwise work, the gpu mode's AdamW
  double matmul_tflops_bf16 = 0;
  double matmul_tflops_fp16 = 0;
  double matmul_tflops_fp32 = 0;
  double pcie_h2d_gbps = 0;
  double pcie_d2h_gbps = 0;
  std::vector<NvmeFigures> nvme;
  // Whether NVMe reads and writes share the drives' time (a mixed load gets each rate for its
  // share of the time, as flash does) or run side by side at full rate each.
  bool nvme_shared = true;
  double cpu_adam_params_per_s = 0;  // ferry's CPU AdamW, fp32 states, all cores
  // Standard normals zo2's kernel draws per second on the device (Philox, Box-Muller): what
  // bounds its kernels, more than their memory traffic. 0: unknown (memory traffic only).
  double zo_normals_per_s = 0;
  std::uint64_t host_memory_bytes = 0;
  // The collectives between data-parallel ranks: a reduce-scatter's or all-gather's bus bandwidth
  // (NCCL's "busbw", GB/s: a buffer of B bytes over N ranks takes B (N - 1) / N / busbw). Not
  // calibrated by one machine alone; 0: unknown.
  double link_gbps = 0;

  double matmul_tflops(Precision precision) const;
  // The aggregate over `directories`, striped: the sum of their figures. A directory without a
  // figure of its own counts as the mean of the known ones; none given: the sum of all known.
  double nvme_read_gbps(const std::vector<std::string>& directories = {}) const;
  double nvme_write_gbps(const std::vector<std::string>& directories = {}) const;
  NvmeIoSettings nvme_io_for(const std::vector<std::string>& directories) const;

  std::string to_json() const;
  // Throws ferry::Error naming the file and the bad field.
  static Hardware from_json(const std::string& text, const std::string& file);
  static Hardware load(const std::string& path);
  void save(const std::string& path) const;
};

// What calibrate() measures besides the fixed figures (matmul, device memory, PCIe, CPU AdamW).
struct CalibrationOptions {
  std::vector<std::string> nvme_directories;  // each measured through the I/O engine
  std::uint64_t nvme_bytes = std::uint64_t{1} << 30;  // per pass and direction
  unsigned repeat = 3;                         // runs per figure; the median is kept
  // Small sizes, about a second on a CPU: a 512 x 512 matmul (2048 on a GPU), 32 MiB copies and
  // AdamW over 4M parameters. The figures are rougher; a front end that plans before it runs
  // uses it when no calibration file is given.
  bool quick = false;
};

// Measures this machine with ferry's own kernels and I/O engine (`ferry bench calibrate`):
// minutes on a GPU machine, dominated by the NVMe passes. `report` gets one line per figure.
// Throws ferry::Error for an NVMe directory that is missing or has under 2 MiB free. One without
// O_DIRECT is measured through the page cache and one with less room than nvme_bytes with what
// fits; `report` says so. The scratch file is removed on every way out.
Hardware calibrate(const CalibrationOptions& options,
                   const std::function<void(const std::string&)>& report = {});

// Named machines: "h100" and "h200" (ferry's GPU machines, docs/benchmarks.md), "rtx4090-fuyou"
// (the server of the Fuyou paper), "h100-zo2" (ZO2's). Throws, listing the valid names, for an
// unknown one.
Hardware hardware_preset(const std::string& name);
std::vector<std::string> hardware_preset_names();

// What precision "auto" means on a planned machine, as preferred_precision(device) on the one a
// job runs on: bf16 when it has a GPU, fp32 when the "GPU" is the host.
Precision preferred_precision(const Hardware& hardware);

// --- the request ------------------------------------------------------------------------------

// How attention keeps its scores: fused (SDPA flash / memory-efficient kernels: LibTorch >= 2 on
// CUDA, no seq x seq tensor) or materialized (the scores and softmax in memory: ferry on
// LibTorch 1.13, Hugging Face's eager attention).
enum class AttentionKernel { kFused, kMaterialized };
const char* to_string(AttentionKernel kernel);
AttentionKernel parse_attention_kernel(const std::string& name);  // "fused", "materialized"
AttentionKernel default_attention_kernel();  // what this build of ferry runs

// Compute seconds measured on the real model (Engine::stats() with EngineConfig::trace on), in
// EngineStats' layout: index 0 the stem, 1..n the blocks, n+1 the head. A block's backward
// includes its recomputation: measure with every block recomputed, as fuyou's profiling step does
// (every checkpoint on NVMe). They replace the FLOP-based estimates, scaled by tokens for another
// batch or sequence length.
struct MeasuredCompute {
  std::int64_t batch = 0;  // the micro-batch and sequence length they were measured at
  std::int64_t seq = 0;
  std::vector<double> part_forward_seconds;
  std::vector<double> part_backward_seconds;
  // The CPU worker's AdamW rate in the step (EngineStats::cpu_updated_elements over
  // cpu_update_seconds), where the step's copies share the host's memory with it; replaces
  // Hardware::cpu_adam_params_per_s, measured alone. 0: not measured (no part updated by the CPU).
  double cpu_update_params_per_s = 0;
};

// The engine settings profile_compute measures with: `config` with every block recomputed, each
// checkpoint where `config` keeps it and a block that keeps its graph checkpointing on the GPU
// (so it fits wherever `config` does); fuyou, whose plan chooses the checkpoints after the
// profile, every checkpoint on NVMe and no block's parameters in host memory. One micro-batch a
// step, tracing on.
EngineConfig profiling_config(EngineConfig config, std::int64_t blocks);

// Measures the compute the plan replays, on the real model and device: two training steps of
// `batch` on an engine of its own with profiling_config(config); the second is measured (the
// first pays for first-touch allocations and the page cache). With config.communicator, as one
// data-parallel engine whose ranks all get their mean (the same plan everywhere). The steps change
// the model's weights: the job builds or loads its model again.
MeasuredCompute profile_compute(LayeredModel model, const EngineConfig& config, const data::Batch& batch);

// MeasuredCompute as a JSON object of its fields, and back (the Python front end passes profiles
// so); from_json throws ferry::Error naming `origin` and the field that is missing or wrong.
std::string measured_compute_to_json(const MeasuredCompute& measured);
MeasuredCompute measured_compute_from_json(const std::string& text, const std::string& origin);

// Activations as the front ends take them: one parse_block_activations name for every block
// ("nvme"), or a comma list with one per block. Throws ferry::Error for an unknown name or a list
// of another length.
std::vector<BlockActivations> parse_activations(const std::string& text, std::int64_t blocks);

struct PlanRequest {
  std::string model_name;  // for the report: the preset or directory
  models::ModelConfig model;
  // Mode, precision, budgets (0: unlimited), NVMe directories, optimizer, zo and fuyou settings,
  // grad_accumulation, max_grad_norm, activations (or keep_graph_blocks, offload_checkpoints): as
  // the engine would get them. device is ignored (hardware.gpu_is_host says).
  EngineConfig engine;
  std::int64_t batch = 1;  // sequences per micro-batch
  std::int64_t seq = 1024;
  AttentionKernel attention = default_attention_kernel();
  // fuyou: choose each block's checkpoint tier (gpu, host or nvme) for the shortest step within
  // the budgets. Off, or in the other modes, engine.activations (or keep_graph_blocks and
  // offload_checkpoints) decide.
  bool choose_activations = true;
  // fuyou: give the blocks' parameters as much host memory as the budget leaves
  // (FuyouConfig::host_blocks). Off: engine.fuyou.host_blocks as given.
  bool choose_host_blocks = true;
  // gpu, zero-offload and fuyou with grad_accumulation > 1: plan both micro-batch orders, each
  // with its own activations, and keep the faster one that fits. Off: engine.micro_batch_order
  // as given.
  bool choose_micro_batch_order = true;
  // Above 0: choose the micro-batch among the powers of two up to max_batch (at `seq`), the one
  // with the most tokens/s that fits, choosing activations for each; `batch` is then ignored.
  std::int64_t max_batch = 0;
  std::optional<MeasuredCompute> measured;
  Hardware hardware;
  // Data-parallel ranks on one host (torchrun's --nproc-per-node, one device each), each with
  // the budgets above (a host budget of 0: the host's memory shared evenly) and the hardware's
  // figures: the plan is one rank's, whose ZeRO-2 shards of the fp32 master
  // and optimizer states are 1/world_size of the model's, and its step includes the gradients'
  // reduce-scatter and the parameters' all-gather (Hardware::link_gbps; without it they are
  // not timed, and the report says so). tokens_per_s and the TFLOPS are one rank's too.
  int world_size = 1;
};

// --- the plan ---------------------------------------------------------------------------------

enum class Resource { kCompute, kPcieUp, kPcieDown, kNvmeRead, kNvmeWrite, kCpuOptimizer, kCollectives };
constexpr int kResourceCount = 7;
const char* to_string(Resource resource);

struct PlanItem {
  Tier tier;
  std::string role;  // "parameters", "fp32 master", "activation checkpoints", ...
  std::uint64_t bytes;
};

// One span of the predicted step, for the Chrome trace.
struct PlanSpan {
  std::string name;  // "forward block.3", "NVMe read block.3 states", ...
  Resource resource;
  double start_s;
  double end_s;
};

struct Plan {
  PlanRequest request;
  std::vector<PlanItem> items;  // by tier, activations included
  std::uint64_t tier_bytes[kTierCount] = {0, 0, 0};  // the peak the plan predicts per tier
  std::uint64_t tier_budget[kTierCount] = {0, 0, 0};  // 0: unlimited
  bool fits = true;
  std::vector<std::string> shortfalls;  // "gpu tier: needs 30.1 GiB, budget 24.0 GiB: 6.1 GiB short"
  std::vector<std::string> fixes;       // the smallest changes that fit, best first

  std::vector<BlockActivations> activations;  // one per block; empty for zo2 (no backward)
  // The first-order placement the plan sized: a preset's, or the one mode auto chose, with the
  // reasons for auto's choice.
  Placement placement;
  std::vector<std::string> placement_notes;
  std::int64_t host_blocks = 0;        // fuyou: blocks whose parameters live in host memory
  MicroBatchOrder micro_batch_order = MicroBatchOrder::kBatchMajor;
  std::uint64_t checkpoint_bytes = 0;  // one block's input, one micro-batch
  std::uint64_t graph_bytes = 0;       // one block's kept autograd graph, one micro-batch

  double step_seconds = 0;
  double tokens_per_s = 0;
  double model_tflops = 0;     // useful FLOPs / step time (6 N T first-order, 4 N T per zo sample)
  double hardware_tflops = 0;  // FLOPs executed (recomputation and attention included) / step time
  double busy_seconds[kResourceCount] = {};
  std::uint64_t moved_bytes[kResourceCount] = {};  // per step; compute: 0
  Resource bottleneck = Resource::kCompute;  // the resource busy longest
  std::vector<PlanSpan> spans;
};

// Throws ferry::Error for a request the engine would reject (invalid shapes, settings, a mode
// without the NVMe directories it needs, hardware figures that are missing).
Plan make_plan(const PlanRequest& request);

// The engine settings that run the plan: the request's, with the chosen activations, micro-batch
// order and, for fuyou, host_blocks filled in. Train with micro-batches of plan.request.batch.
EngineConfig plan_engine_config(const Plan& plan);

std::string format_plan(const Plan& plan);  // the table `ferry plan` prints
std::string plan_to_json(const Plan& plan);
// The predicted step as a Chrome trace, in the format of the engine's own traces (one track per
// resource). Throws ferry::Error when the file cannot be written.
void write_plan_trace(const Plan& plan, const std::string& path);

}  // namespace ferry
