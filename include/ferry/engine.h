#pragma once

// The execution engine (docs/architecture.md, layer 6): drives a LayeredModel block by block,
// with the parameters, gradients and optimizer states of each part (stem, every block, head) in
// bundles of the residency manager. A placement (ferry/placement.h) says on which tier each of
// them lives and where each part's update runs; the step itself is one code path for every
// placement. See docs/engine.md.
//
//   ferry::Engine engine(std::move(model), config);
//   for (...) {
//     torch::Tensor loss = engine.forward(batch);
//     engine.backward(loss);
//     engine.step();           // or: engine.train_step(batch)
//   }

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/types.h>

#include "ferry/data.h"
#include "ferry/model.h"
#include "ferry/placement.h"
#include "ferry/store.h"

namespace ferry {

namespace detail {
class Trainer;
}
namespace dist {
class Communicator;  // ferry/dist.h
}

// The first-order modes are presets of one placement (ferry/placement.h). gpu: everything on the
// device, the reference. zero-offload: parameters on the device, gradients, fp32 master and
// optimizer states on the host, the CPU optimizer overlapped with backward. fuyou: gradients,
// fp32 master and optimizer states on NVMe and the blocks' parameters too (but for
// FuyouConfig::host_blocks), blocks streamed through the device and the host, the CPU optimizer
// overlapped with backward, activation checkpoints swapped (docs/fuyou.md). auto: the placement
// in EngineConfig::placement, which the planner chooses (plan_engine_config(make_plan(...))).
// zo2: zeroth-order (MeZO), forward only, block weights streamed from host memory or NVMe.
enum class Mode { kGpu, kZeroOffload, kFuyou, kAuto, kZo2 };
const char* to_string(Mode mode);
Mode parse_mode(const std::string& name);  // "gpu", "zero-offload", "fuyou", "auto", "zo2"

Tier parse_tier(const std::string& name);  // "gpu", "host", "nvme"

enum class Precision { kF32, kBF16, kF16 };
const char* to_string(Precision precision);
Precision parse_precision(const std::string& name);  // "fp32", "bf16", "fp16"
// What precision "auto" means on `device`: bf16 on CUDA (ferry's kernels need sm_80 or newer,
// which computes it natively), fp32 on the CPU.
Precision preferred_precision(const torch::Device& device);

enum class OptimizerKind { kAdamW, kAdam, kSgd, kAdagrad };
const char* to_string(OptimizerKind kind);
OptimizerKind parse_optimizer(const std::string& name);  // "adamw", "adam", "sgd", "adagrad"

struct OptimizerConfig {
  OptimizerKind kind = OptimizerKind::kAdamW;
  double lr = 1e-3;
  double beta1 = 0.9;          // adamw, adam
  double beta2 = 0.999;        // adamw, adam
  double eps = 1e-8;           // adamw, adam, adagrad
  double weight_decay = 0.0;   // not applied to norms and biases (is_no_decay)
  double momentum = 0.0;       // sgd
  bool nesterov = false;       // sgd
};

enum class LrSchedule { kConstant, kLinear, kCosine };
const char* to_string(LrSchedule schedule);
LrSchedule parse_schedule(const std::string& name);  // "constant", "linear", "cosine"

struct ScheduleConfig {
  LrSchedule kind = LrSchedule::kConstant;
  std::int64_t warmup_steps = 0;  // linear from 0 to lr over these steps
  std::int64_t total_steps = 0;   // linear and cosine decay end here; required for them
  double min_lr_ratio = 0.0;      // the floor of the decay, as a fraction of lr
};

// Dynamic loss scaling, as torch.cuda.amp.GradScaler: on by default for fp16.
struct LossScaleConfig {
  std::optional<bool> enabled;   // default: precision == fp16
  double initial_scale = 65536.0;
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  std::int64_t growth_interval = 2000;
};

enum class ZoTransfer : std::uint8_t { kStorage, kBF16, kFp8 };
const char* to_string(ZoTransfer transfer);
ZoTransfer parse_zo_transfer(const std::string& name);  // "storage", "bf16", "fp8"

// How the blocks' frozen parameters (a LoRA base) are stored wherever they live: in the compute
// dtype, or in fp8 e4m3fn with one fp32 scale per output channel (a row of a matrix, an element of
// a vector), decoded to the compute dtype on the device each time a block visits it (forward and
// again in backward). The stem's and head's frozen parameters stay in the compute dtype.
enum class BaseStorage : std::uint8_t { kCompute, kFp8 };
const char* to_string(BaseStorage storage);
BaseStorage parse_base_storage(const std::string& name);  // "compute", "fp8"

// Zeroth-order training (mode zo2; MeZO, Malladi et al. 2023, as ZO2 runs it). Each step draws
// `samples` directions z ~ N(0, I), regenerated from a counter-based generator keyed by the step's
// seed and the part (never stored); the projected gradient of sample s is
// g_s = (loss(theta + eps z_s) - loss(theta - eps z_s)) / (2 eps), and the update direction is the
// mean of g_s z_s. The optimizer (OptimizerConfig) consumes it: sgd (with momentum when set),
// adam or adamw; weight decay skips norms and biases. See docs/zo2.md.
struct ZoConfig {
  double eps = 1e-3;
  std::int64_t samples = 1;
  std::uint64_t seed = 0;
  // Where the blocks' weights (and their optimizer states) live: host (pinned) or nvme, streamed
  // through the device; or gpu, everything resident (MeZO's all-GPU setting, the baseline).
  // `gpu_blocks` blocks stay resident on the device (host or nvme only), spread evenly with the
  // first block among them: each is a block not uploaded every step. With nvme, the first
  // `host_blocks` of the other blocks stay in host memory. The stem and head stay on the GPU.
  // kAutoGpuBlocks: the most blocks that fit the gpu budget.
  Tier block_tier = Tier::kHost;
  static constexpr std::int64_t kAutoGpuBlocks = -1;
  std::int64_t gpu_blocks = 0;
  std::int64_t host_blocks = 0;
  // The stored weights' precision; default: the compute precision. fp32 storage under bf16/fp16
  // compute is an fp32 master: needed when lr * |update| is below half an ulp of the weights
  // (bf16 has 8 mantissa bits: updates under ~0.4% of a weight round away).
  std::optional<Precision> storage;
  // What crosses PCIe for a streamed block: its stored weights (kStorage), or a compressed copy
  // of them, bf16 or fp8 (e4m3fn with one fp32 scale per parameter tensor). A compressed copy is
  // lossy and never comes back: the CPU applies each update to the stored weights at home and
  // writes the next copy, a few blocks ahead of the GPU (blocks in host memory only).
  ZoTransfer transfer = ZoTransfer::kStorage;
  // Blocks on the device at once: one computing, the next ones uploading, earlier ones going down.
  std::int64_t blocks_in_flight = 3;
  // A streamed block's updated weights go home every this many steps (blocks take turns); in
  // between, each upload replays the missing updates on the device, so a step downloads
  // 1/write_back_interval of the model. 1 to 8; 1 is ZO2's every-step write-back.
  std::int64_t write_back_interval = 4;
};

// Fuyou (Liao et al., arXiv 2403.06504): every part's gradients, fp32 master and optimizer states
// live on NVMe, and the blocks' parameters too, apart from the first `host_blocks` blocks, whose
// parameters stay in host memory. The stem's and head's parameters stay on the device.
struct FuyouConfig {
  std::int64_t host_blocks = 0;
  // Blocks whose parameters (and swapped checkpoints) are on the device at once: one computing,
  // the next ones uploading. In every placement that streams parameters, not only fuyou's.
  std::int64_t blocks_in_flight = 3;
};

// The order of a step's micro-batches (grad_accumulation > 1). batch-major: each micro-batch runs
// forward and backward through the whole model before the next (forward/backward/step by hand,
// or train_step). layer-major (GreedySnake, arXiv 2512.17570): all of them pass through a block
// before the next block, so each block's parameters, gradients and optimizer states move once
// per step instead of once per micro-batch; train_step collects the micro-batches and runs the
// step with the last one.
enum class MicroBatchOrder { kBatchMajor, kLayerMajor };
const char* to_string(MicroBatchOrder order);
MicroBatchOrder parse_micro_batch_order(const std::string& name);  // "batch-major", "layer-major"

// ZeRO-Offload's one-step delayed parameter update (DPU; Ren et al. 2021, section 5.2), for mode
// zero-offload. After `warmup_steps` ordinary steps, step t's CPU update runs while the device
// runs step t+1's forward and backward with the parameters of before step t; each part's new
// parameters go up once its backward in step t+1 is done, and step t+1's update follows on
// them. So from the second delayed step on, gradients are one update stale, and the optimizer is
// off the critical path as long as it is not slower than a step of compute. See docs/engine.md.
struct DelayedUpdateConfig {
  bool enabled = false;
  std::int64_t warmup_steps = 0;  // ordinary steps before the first delayed one
};

// The seed of sample `sample`'s direction in step `step` (counted from 1): z for part p is the
// Philox normal sequence optim::ZoDirection{seed, p} over the part's parameters, laid out as the
// engine packs them (decayed parameters first, in registration order, then norms and biases).
std::uint64_t zo_step_seed(std::uint64_t seed, std::int64_t step, std::int64_t sample);

// Dropout in training forwards: the model's own rates (config.json's, ModelConfig::dropout)
// unless `rate` overrides them all. Masks come from `seed`, the step, the micro-batch and the part
// (ferry::dropout), so recomputation replays them and every mode and placement draws the same.
struct DropoutConfig {
  std::optional<double> rate;
  std::uint64_t seed = 0;
};

// How much of what the engine reads back is checked against its recorded XXH64 checksums: a
// checkpoint on load() and a staged layout on adoption (docs/launcher.md, "Reliability").
// full: every byte. sampled: every bundle of a layout (one chunk of each at least) and every
// tensor of a checkpoint in part, chosen at random anew each time, at least a sixteenth of the
// bytes. auto: full for a checkpoint of at most kFullVerifyCheckpointBytes, sampled above it,
// and sampled for a staged layout. none: nothing (the headers are still checked).
enum class Verify { kAuto, kFull, kSampled, kNone };
const char* to_string(Verify verify);
Verify parse_verify(const std::string& name);  // "auto", "full", "sampled", "none"
inline constexpr std::uint64_t kFullVerifyCheckpointBytes = std::uint64_t{32} << 30;

struct EngineConfig {
  Mode mode = Mode::kZeroOffload;
  Precision precision = Precision::kF32;
  torch::Device device = torch::kCPU;  // the GPU tier; kCPU runs everything on the host
  std::uint64_t gpu_budget_bytes = 0;   // 0: everything the mode needs on the device
  // Of the gpu budget, what the store leaves free for autograd: kept graphs and working
  // activations, which the plan sizes (plan_engine_config fills it in).
  std::uint64_t gpu_working_bytes = 0;
  std::uint64_t host_budget_bytes = 0;  // 0: everything the mode needs on the host
  // The NVMe tier's directories (one per SSD; files are striped over them) and its budget.
  std::vector<std::string> nvme_directories;
  std::uint64_t nvme_budget_bytes = 0;  // 0: no limit beyond the disks'
  Env* nvme_env = nullptr;  // opens the NVMe tier's files; nullptr: Env::posix(). Tests inject faults
  // The NVMe tier's I/O engine: transfers in flight and the size large ones are split into; 0
  // keeps IoOptions' defaults. `ferry finetune` takes what `ferry bench calibrate` measured
  // fastest for the directory.
  unsigned nvme_queue_depth = 0;
  std::uint64_t nvme_block_bytes = 0;
  // A layout `ferry stage` wrote (include/ferry/stage.h): the directory holding its manifest, the
  // first NVMe directory. The engine adopts its files in place of the model's weights; the
  // layout then becomes the job's live state (docs/stage.md). Empty: weights come from the model.
  std::string staged;
  Verify verify = Verify::kAuto;
  // Writes checkpoints (save) and exports (export_pretrained); nullptr: Env::posix(). Tests inject
  // faults through it.
  Env* checkpoint_env = nullptr;
  OptimizerConfig optimizer;
  ScheduleConfig schedule;
  LossScaleConfig loss_scale;
  ZoConfig zo;        // mode zo2 only
  BaseStorage base_storage = BaseStorage::kCompute;  // with frozen parameters only
  FuyouConfig fuyou;  // mode fuyou only
  DelayedUpdateConfig delayed_update;  // mode zero-offload only
  DropoutConfig dropout;
  std::int64_t grad_accumulation = 1;  // micro-batches per optimizer step
  MicroBatchOrder micro_batch_order = MicroBatchOrder::kBatchMajor;
  double max_grad_norm = 0.0;          // global-norm clipping; 0 turns it off
  // Activation checkpointing at block boundaries: the last `keep_graph_blocks` blocks keep their
  // autograd graph from the forward; the others keep only their input and are recomputed in
  // backward. `offload_checkpoints` keeps those inputs in host memory instead of on the device.
  std::int64_t keep_graph_blocks = 0;
  bool offload_checkpoints = false;
  // Each part's homes (mode auto: required; the presets fill them in) and each block's
  // activations (empty: the two settings above decide); `ferry plan` chooses both.
  Placement placement;
  // Data parallelism (ferry/dist.h, docs/distributed.md): each rank passes its own rows of every
  // batch, the gradients (zo2: the projected gradients) are summed across the ranks, and every
  // rank applies the same update; the losses reported are the ranks' mean. Every rank must build
  // the same model. nullptr: this process alone.
  std::shared_ptr<dist::Communicator> communicator;
  // Threads for the CPU optimizer (0: one per core).
  int optimizer_threads = 0;
  // Record spans for write_trace(). On a CUDA device the engine then waits for the device at
  // every part boundary, so compute spans are real at the cost of some overlap.
  bool trace = false;
};

// The engine's sizing: the bytes it keeps on each tier for a model, activations aside. For the
// first-order modes it is the engine's own set-up counted without allocating (each part's bundles
// at home and the pools every copy away from home is drawn from), so the engine takes exactly
// this; it refuses to start when a budget cannot hold it, and `ferry plan` reports it for models
// that are never built.
struct PartShape {
  std::string name;    // "stem", "block.0", ..., "head"
  std::int64_t numel;  // the trained parameters the part owns (a tied head owns none of the embedding)
  std::int64_t frozen_numel = 0;  // its frozen ones (a LoRA base): parameters only, read-only
  std::int64_t frozen_channels = 0;  // their output channels: an fp8 base keeps a scale for each
};
std::vector<PartShape> part_shapes(const models::ModelConfig& config);

struct TierDemand {
  struct Item {
    std::string role;  // "parameters", "fp32 master", ...
    std::uint64_t bytes;
  };
  std::uint64_t bytes[kTierCount] = {0, 0, 0};
  std::vector<Item> items[kTierCount];
  std::string describe(Tier tier) const;  // "parameters 12.0 MiB, gradients 12.0 MiB"
};
// With `checkpoint_bytes` (one block's input for one micro-batch, as the first forward finds it),
// the activation checkpoints' bundles and pools too. Throws ferry::Error for a configuration the
// engine would reject.
TierDemand engine_demand(const std::vector<PartShape>& parts, const EngineConfig& config,
                         std::uint64_t checkpoint_bytes = 0);
// zo2: the blocks kept resident on the device: zo.gpu_blocks, or for kAutoGpuBlocks the most
// whose engine_demand fits the gpu budget (0 when none does).
std::int64_t zo_gpu_blocks(const std::vector<PartShape>& parts, const EngineConfig& config);

// The engine's settings from a JSON object, under the names `ferry finetune` uses for its flags
// and config file: "mode", "precision" (or "auto": preferred_precision of the device), "device"
// ("auto", "cpu", "cuda", "cuda:N"),
// "gpu_budget" and "host_budget" (bytes or "24GiB"; 0: no limit), "gpu_working" (the part of the
// gpu budget left for activations), "placement" (placement_to_json's object), "optimizer", "lr", "beta1",
// "beta2", "eps", "weight_decay", "momentum", "nesterov", "schedule", "warmup", "steps" (the
// schedule's total), "min_lr_ratio", "grad_accum", "max_grad_norm", "loss_scale" (true, false or
// null: the precision decides), "keep_graph_blocks", "offload_checkpoints",
// "optimizer_threads", "trace" (a bool, or a trace file name: on when not empty), "nvme" (a list
// of directories, or one text with commas), "nvme_budget", "staged" (a staged layout's directory),
// and for zo2 "seed", "zo_eps", "zo_samples", "zo_blocks" (a tier), "zo_gpu_blocks" (a number or
// "auto"), "zo_host_blocks", "zo_storage" (a precision, or "" for the compute precision),
// "zo_transfer" ("storage", "bf16" or "fp8"), "zo_window" (ZoConfig's blocks_in_flight) and
// "zo_write_back", for fuyou
// "fuyou_host_blocks" and "fuyou_window" (FuyouConfig's blocks_in_flight), and "activations" (a
// list, or one text with commas, of parse_block_activations names, one per block),
// "micro_batch_order" ("batch-major" or "layer-major"), "base_storage" ("compute" or "fp8"), for zero-offload "delayed_update" (a bool)
// and "delayed_update_warmup" (DelayedUpdateConfig's warmup_steps), "dropout" (a rate for every
// dropout of the model, or "auto" / null for config.json's); "seed" also seeds the dropout masks.
// A missing key
// keeps EngineConfig's default. Throws ferry::Error for text that is not a JSON object, an
// unknown key (listing the valid ones) or a value of the wrong type. The front ends (CLI,
// Python) share it, so a setting means the same everywhere.
EngineConfig engine_config_from_json(const std::string& json_text);
const std::vector<std::string>& engine_config_keys();

// What one optimizer step did.
struct StepResult {
  std::int64_t step = 0;      // optimizer steps taken so far, skipped ones included
  double loss = 0;            // mean loss of the step's micro-batches
  double lr = 0;
  double grad_norm = 0;       // before clipping; NaN when the gradients were not finite
  double loss_scale = 1;
  bool skipped = false;       // non-finite gradients (fp16 overflow): nothing was updated
  std::int64_t tokens = 0;    // input tokens over the step's micro-batches
  // zo2: per sample, the losses at theta + eps z and theta - eps z and the projected gradient.
  // `loss` is then the mean of both losses over the samples.
  std::vector<double> loss_plus, loss_minus, projected_grads;
};

// Seconds per phase, accumulated since construction; the residency manager's own statistics
// come with it.
struct EngineStats {
  std::int64_t steps = 0;
  double forward_seconds = 0;
  double backward_seconds = 0;
  double optimizer_seconds = 0;        // CPU or device time inside optimizer updates
  double optimizer_wait_seconds = 0;   // time the step waited for updates still running
  // Of optimizer_seconds, the CPU worker's arithmetic on the parts it updates (staging waits
  // left out), and the elements it updated: its rate while the step's copies share the host.
  double cpu_update_seconds = 0;
  std::int64_t cpu_updated_elements = 0;
  // Per part (stem, blocks, head), with EngineConfig::trace on (the device is then synchronized
  // after each span, so these are compute alone): seconds of forward, and of backward with its
  // recomputation. Empty without tracing.
  std::vector<double> part_forward_seconds, part_backward_seconds;
  StoreStats store;
};

class Engine {
 public:
  // Takes the model, moves its parameters into bundles on the tiers the mode chooses and binds
  // the modules to views of them. Throws BudgetExceeded, naming the tier and the shortfall, when
  // the budgets cannot hold what the mode needs; nothing is allocated past a budget.
  Engine(LayeredModel model, EngineConfig config);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Note: forward, train_step and evaluate check the batch first (data::check_batch, with
  // vocab_size()), and logits its tokens: a bad one throws ferry::Error naming the tensor, before
  // any state changes.

  // One micro-batch: returns its loss (a scalar); backward() must follow before the next forward.
  // The first-order modes only: zo2 trains with train_step().
  torch::Tensor forward(const data::Batch& batch);
  void backward(const torch::Tensor& loss);
  // Applies the accumulated gradients. Call once every grad_accumulation micro-batches.
  StepResult step();
  // forward, backward and, every grad_accumulation micro-batches, step. Returns the step's result
  // when one was taken.
  std::optional<StepResult> train_step(const data::Batch& batch);

  // zo2 applies each step's update when the parts next come to the device (in the next step), and
  // a delayed update (DelayedUpdateConfig) reaches the device after the parts' next backward;
  // flush() applies it now, so the next step computes with the latest parameters. evaluate,
  // logits, generate, save and load flush first; call it at the end of training before reading
  // the weights any other way. A no-op when nothing is pending. With a delayed update pending it
  // throws between the micro-batches of a step, which must all see the same parameters.
  void flush();

  // Loss without gradients, and logits for generation. Neither changes the training state.
  double evaluate(const data::Batch& batch);
  torch::Tensor logits(const torch::Tensor& tokens);
  // Greedy decoding of up to max_new_tokens after prompt, stopping at stop_token when given.
  std::vector<std::int64_t> generate(const std::vector<std::int64_t>& prompt,
                                     std::int64_t max_new_tokens,
                                     std::optional<std::int64_t> stop_token = std::nullopt);

  // Checkpoints: a directory with the weights as safetensors under Hugging Face names
  // (fp32 master weights), the optimizer state, and trainer_state.json (step, schedule, loss
  // scale, `extra`, e.g. the data loader's position, and every tensor's XXH64). Frozen parameters
  // (a LoRA base) are not saved, only their count and the adapters' settings, which load()
  // checks. Written atomically: into "<dir>.partial", every file fsynced, then swapped in place
  // of `dir` and the parent directory fsynced; a failure or a crash at any point leaves `dir` as
  // it was. With several ranks whose optimizer states are sharded, every rank writes its own
  // shard (optimizer.rank<r>.safetensors, the fp32 master among them) and rank 0 the weights in
  // the compute dtype (docs/distributed.md); a failure on any rank stops every rank, naming it.
  void save(const std::string& dir, const std::string& extra_json = "{}");
  // Restores what save wrote, with any world size (each rank reads its own shard of a
  // checkpoint of several ranks); returns `extra`. The model must have the same shape. The tensors
  // read are checked against their checksums as config().verify says; a mismatch throws naming
  // the tensor and its file (the engine's state is then undefined: load another checkpoint).
  std::string load(const std::string& dir);
  // The trained model for inference: config.json and safetensors under Hugging Face names in
  // `precision`, sharded as transformers does, no optimizer state; written atomically like save,
  // with `extra_files` (name -> contents: the tokenizer's files, generation_config.json) in the
  // same directory before it is swapped in. With LoRA the adapters are merged into the frozen
  // base (W + alpha / rank * B A). Flushes first. Built-in families only.
  void export_pretrained(const std::string& dir, Precision precision,
                         const std::map<std::string, std::string>& extra_files = {});
  // The LoRA adapters as PEFT saves them, for PeftModel.from_pretrained: adapter_config.json and
  // adapter_model.safetensors (fp32, PEFT's names). Written atomically like save.
  void export_adapter(const std::string& dir, const std::string& base_model_name_or_path = "");

  // Writes the spans recorded so far (config.trace) as a Chrome trace and returns a one-line
  // summary of how much of the CPU optimizer's time overlapped compute.
  std::string write_trace(const std::string& path) const;

  const LayeredModel& model() const;
  // Every part's parameters, frozen ones included, wherever they live (model().parameter_count()
  // counts only those bound on the device at the moment); and the trainable ones alone.
  std::int64_t parameter_count() const;
  std::int64_t trainable_parameter_count() const;
  // The token ids a batch may hold, [0, vocab_size): the model config's vocabulary, else the rows
  // of the stem's token embedding; nullopt when the model names neither.
  std::optional<std::int64_t> vocab_size() const;
  const EngineConfig& config() const;
  std::int64_t steps_taken() const;
  double current_lr() const;
  EngineStats stats() const;

 private:
  std::unique_ptr<detail::Trainer> trainer_;  // the first-order engine or zo2
  std::optional<std::int64_t> vocab_size_;    // read before the trainer rebinds the parameters
};

// Sampling settings of generate(): greedy at temperature 0, else softmax(logits / temperature)
// restricted to the top_k most likely tokens (0: all) and then to the smallest set whose
// probability reaches top_p (nucleus sampling), drawn from a generator seeded by `seed`.
// Generation_config.json's do_sample, temperature, top_k, top_p and max_new_tokens map onto these.
struct GenerationOptions {
  std::int64_t max_new_tokens = 128;
  double temperature = 0;
  double top_p = 1;
  std::int64_t top_k = 0;
  std::vector<std::int64_t> stop_ids;  // generation ends before any of these
  std::uint64_t seed = 0;
  // Only ids below this are generated (the tokenizer's vocabulary, when the model's embedding is
  // padded past it); 0: every id of the model.
  std::int64_t vocab_size = 0;
};
// The new tokens after prompt. Each step runs the whole sequence again (Engine::logits): no
// key-value cache.
std::vector<std::int64_t> generate(Engine& engine, const std::vector<std::int64_t>& prompt,
                                   const GenerationOptions& options);

// Held-out evaluation: the mean loss over every learned token of the batches (each batch's
// mean weighted by its learned tokens) and its exponential, the perplexity.
struct EvaluationResult {
  double loss = 0;
  double perplexity = 0;
  std::int64_t tokens = 0;   // learned tokens counted
  std::int64_t batches = 0;
};
// Runs a single-pass loader (LoaderOptions::single_pass) to its end; changes no training state.
EvaluationResult evaluate(Engine& engine, data::DataLoader& loader);
// The same over batches at hand.
EvaluationResult evaluate(Engine& engine, const std::vector<data::Batch>& batches);

}  // namespace ferry
