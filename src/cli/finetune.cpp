// `ferry finetune`: a fine-tuning job from flags and/or a JSON config. With no arguments it
// fine-tunes a tiny LLaMA-shaped model on the built-in addition task in zero-offload mode, on
// whatever machine it runs on, and reports the exact-match accuracy before and after.

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <cxxopts.hpp>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/command.h"
#include "cli/preflight.h"
#include "cli/progress.h"
#include "cli/job_options.h"
#include "ferry/data.h"
#include "ferry/dist.h"
#include "ferry/engine.h"
#include "ferry/fs.h"
#include "ferry/job.h"
#include "ferry/io.h"
#include "ferry/lock.h"
#include "ferry/memory.h"
#include "ferry/model.h"
#include "ferry/plan.h"
#include "ferry/run.h"
#include "ferry/stage.h"
#include "ferry/store.h"
#include "ferry/system.h"
#include "ferry/tokenizer.h"

namespace ferry::cli {
namespace {

using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;

LayeredModel load_model(const Json& job) {
  const std::string name = job["model"];
  if (is_directory_name(name)) return models::from_pretrained(name, {std::nullopt, job_lora(job), job["seed"]});
  models::ModelConfig config = models::truncated(models::preset(name), job["layers"]);
  config.lora = job_lora(job);
  return models::build(config, job["seed"]);
}

// Stages the job's checkpoint into its NVMe directories unless a layout with every bundle
// complete is there already; the engine then checks that it was made for this job. An unfinished
// layout is continued (finished bundles are verified against their checksums, not rewritten).
void stage_if_needed(const std::string& model, const EngineConfig& config) {
  const std::string manifest = config.staged + "/" + kStageManifestName;
  if (fs::exists(manifest)) {
    const NvmeLayout layout = read_nvme_layout(manifest);
    const bool complete = std::all_of(layout.bundles.begin(), layout.bundles.end(),
                                      [](const LayoutBundle& bundle) { return bundle.complete; });
    if (complete) return;
  }
  FERRY_CHECK(is_directory_name(model), "staged = '", config.staged, "' holds no finished layout, and model '", model,
              "' is a preset: staging reads a Hugging Face checkpoint, so give --model its directory");
  StageOptions options;
  options.model_dir = model;
  options.engine = config;
  options.host_budget_bytes = config.host_budget_bytes;
  options.progress = [](const std::string& bundle, std::uint64_t done, std::uint64_t total) {
    std::fprintf(stderr, "\rstage: %s of %s (%s)   ", format_bytes(done).c_str(), format_bytes(total).c_str(),
                 bundle.c_str());
  };
  const StageReport report = stage_model(options);
  std::fprintf(stderr, "\nstage: %lld bundles written, %lld verified, %s on NVMe in %.1f s: %s\n",
               static_cast<long long>(report.bundles_written), static_cast<long long>(report.bundles_verified),
               format_bytes(report.nvme_bytes).c_str(), report.seconds, report.manifest_path.c_str());
}

std::string describe_shape(const models::ModelConfig& shape) {
  return detail::concat(shape.model_type, ", ", shape.num_layers, " layers, hidden ", shape.hidden_size, ", vocab ",
                        shape.vocab_size, ", ", shape.parameter_count(), " parameters");
}

// Note: the store creates NVMe directories that are missing, which suits tests and scripts. A job
// that may run for days checks them first instead: a mistyped or unmounted path would otherwise
// put the job's NVMe data on whatever disk holds its parent.
void check_nvme_directories(const std::vector<std::string>& directories) {
  for (const std::string& directory : directories) {
    FERRY_CHECK(fs::is_directory(directory), "NVMe directory '", directory, "' does not exist: create it on the ",
                "SSD (mkdir -p ", directory, ") or fix the path given to --nvme");
    const std::string probe = directory + "/.ferry-write-probe-" + std::to_string(::getpid());
    const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    FERRY_CHECK(fd >= 0, "NVMe directory '", directory, "' is not writable (", std::strerror(errno),
                "): give a directory on a writable SSD that this user may write to");
    ::close(fd);
    ::unlink(probe.c_str());
  }
}

// Note: a filesystem without O_DIRECT (tmpfs, ramfs) runs through the page cache, which the store
// announces. ramfs keeps no count of its blocks, so its free space cannot be checked.
void check_nvme_room(const std::vector<std::string>& directories, std::uint64_t nvme_bytes) {
  if (directories.empty()) return;
  const std::uint64_t share = (nvme_bytes + directories.size() - 1) / directories.size();
  for (const std::string& directory : directories) {
    const DiskTierInfo disk = probe_disk_tier(directory);
    if (disk.total_bytes == 0) {
      std::fprintf(stderr, "NVMe directory '%s': its filesystem (%s) reports no size: the %s the job keeps there is "
                   "not checked against free space\n", directory.c_str(), disk.filesystem.c_str(),
                   format_bytes(share).c_str());
      continue;
    }
    FERRY_CHECK(disk.free_bytes >= share, "NVMe directory '", directory, "' has ", format_bytes(disk.free_bytes),
                " free, but the job keeps ", format_bytes(share), " there (", format_bytes(nvme_bytes),
                " striped over ", directories.size(), " directories): free space there, add directories to --nvme, ",
                "or raise --host-budget so that less goes to NVMe");
  }
}

// Note: a budget is a limit the plan fills; one above what the machine has would let it plan for
// memory that is not there. A GPU budget beyond the CUDA device's memory is refused (the job would
// fail with out-of-memory hours in); beyond host memory (the host budget, or the "gpu" budget of a
// CPU device) it is warned, since the kernel may still page.
void check_budgets(const EngineConfig& config) {
  const HostTierInfo host = probe_host_tier();
  if (config.device.is_cuda()) {
    const GpuTierInfo gpu = probe_gpu_tier();
    FERRY_CHECK(!gpu.cuda || config.gpu_budget_bytes <= gpu.total_bytes, "--gpu-budget ",
                format_bytes(config.gpu_budget_bytes), " is more than the device has (", gpu.description,
                "): give at most ", format_bytes(gpu.total_bytes), ", or 0 for the whole device");
  }
  const std::pair<const char*, std::uint64_t> host_budgets[] = {
      {"--host-budget", config.host_budget_bytes}, {"--gpu-budget", config.device.is_cpu() ? config.gpu_budget_bytes : 0}};
  for (const auto& [flag, budget] : host_budgets) {
    if (host.total_bytes == 0 || budget <= host.total_bytes) continue;
    std::fprintf(stderr, "warning: %s %s is more than this machine's %s of memory: the plan counts memory that is not "
                 "there, and the job may page or fail to pin its buffers\n", flag, format_bytes(budget).c_str(),
                 format_bytes(host.total_bytes).c_str());
  }
}

// Note: a checkpoint of another model would be refused by Engine::load, but only after the model
// was built and placed, which for a large model takes long. Its config.json is compared first.
void check_resume_checkpoint(const std::string& dir, const models::ModelConfig& shape, const std::string& model) {
  FERRY_CHECK(fs::is_directory(dir), "resume: checkpoint directory '", dir, "' does not exist: give a checkpoint ",
              "directory, auto (the latest under --out) or none");
  const std::string config_file = dir + "/config.json";
  FERRY_CHECK(fs::exists(config_file), "resume: '", dir, "' has no config.json: it is not a ferry checkpoint");
  const models::ModelConfig saved = models::ModelConfig::from_hf_file(config_file);
  const bool same = saved.model_type == shape.model_type && saved.num_layers == shape.num_layers &&
                    saved.hidden_size == shape.hidden_size && saved.vocab_size == shape.vocab_size &&
                    saved.parameter_count() == shape.parameter_count();
  FERRY_CHECK(same, "resume: checkpoint '", dir, "' holds another model (", describe_shape(saved), ") than the job's ",
              model, " (", describe_shape(shape), "): resume from a checkpoint of this model, or start afresh with ",
              "--resume none");
}

// Note: fuyou and auto plan twice. The first plan places the job from FLOPs and the hardware
// figures; a profile of two steps on an engine of its own (profile_compute) then measures the
// parts' compute and the CPU worker's rate on the real model, and the job runs the plan made from
// them. An engine's activations are fixed when it is built, so the job's engine is built after
// the profile, and the profile's steps changed the weights, so the job loads its model again.
// fuyou's profile keeps every checkpoint on NVMe (its plan then chooses them); auto's runs the
// first plan's placement with every block recomputed. A staged job's weights are not loaded
// twice: it runs its first plan.
bool profiles_first(const Json& job, const EngineConfig& config) {
  if (!config.staged.empty()) return false;
  return config.mode == Mode::kAuto || (config.mode == Mode::kFuyou && (job["activations"] == "auto" ||
                                                                        job["fuyou_host_blocks"] == "auto"));
}

// What fuyou's profile (profile_compute) keeps on NVMe, by the same plan: its placement as
// profiling_config sets it, nothing left for the plan to choose.
std::uint64_t profiling_nvme_bytes(const Json& job, const EngineConfig& config, const models::ModelConfig& shape,
                                   const Hardware& hardware, int world_size) {
  PlanRequest request =
      plan_request(job, profiling_config(config, shape.num_layers), shape, std::nullopt, hardware, world_size);
  request.choose_activations = request.choose_host_blocks = request.choose_micro_batch_order = false;
  return make_plan(request).tier_bytes[static_cast<int>(Tier::kNvme)];
}

// The figures the job plans with. Under torchrun rank 0's, on every rank: each rank measuring its
// own (a quick calibration, side by side on shared drives) would give each its own plan.
Hardware agreed_hardware(const std::string& hardware, const std::vector<std::string>& directories,
                         const std::shared_ptr<dist::Communicator>& communicator) {
  if (!communicator) return job_hardware(hardware, directories);
  Hardware figures;
  std::string error;
  if (communicator->rank() == 0) {
    try {
      figures = job_hardware(hardware, directories);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  communicator->agree("reading the hardware figures", error);
  const std::string text = communicator->rank() == 0 ? figures.to_json() : "";
  return Hardware::from_json(communicator->all_gather_text(text).front(), "rank 0's hardware figures");
}

// Fails, with the plan and its fixes, when the job does not fit its budgets.
void require_fits(const Plan& plan) {
  if (plan.fits) return;
  std::fprintf(stderr, "%s\n", format_plan(plan).c_str());
  std::string shortfalls;
  for (const std::string& shortfall : plan.shortfalls) shortfalls += (shortfalls.empty() ? "" : "; ") + shortfall;
  throw BudgetExceeded(detail::concat("the job does not fit its budgets (", shortfalls,
                                      "): see the fixes listed with the plan above"));
}

void print_plan_summary(const Plan& plan) {
  std::fprintf(stderr, "plan: gpu %s, host %s, nvme %s; predicted %.3f s/step, %.0f tokens/s, bottleneck %s\n",
               format_bytes(plan.tier_bytes[static_cast<int>(Tier::kGpu)]).c_str(),
               format_bytes(plan.tier_bytes[static_cast<int>(Tier::kHost)]).c_str(),
               format_bytes(plan.tier_bytes[static_cast<int>(Tier::kNvme)]).c_str(), plan.step_seconds,
               plan.tokens_per_s, to_string(plan.bottleneck));
}

// The job as it runs: the plan's choices in place of "auto", so that the file is an engine config
// as it stands (the Python Engine takes it) and runs the same job again without planning.
Json resolved_job(Json job, const EngineConfig& config) {
  job["precision"] = to_string(config.precision);
  job["steps"] = config.schedule.total_steps;
  job["warmup"] = config.schedule.warmup_steps;
  job.erase("epochs");  // the two are resolved into steps and warmup above
  job.erase("warmup_ratio");
  job["fuyou_host_blocks"] = config.fuyou.host_blocks;
  job["micro_batch_order"] = to_string(config.micro_batch_order);
  if (!config.placement.parts.empty()) job["placement"] = Json::parse(placement_to_json(config.placement));
  if (config.gpu_working_bytes > 0) job["gpu_working"] = config.gpu_working_bytes;
  if (config.placement.activations.empty()) {
    job.erase("activations");
  } else {
    Json names = Json::array();
    for (const BlockActivations& block : config.placement.activations) {
      names.push_back(block.recompute ? to_string(block.tier) : "graph");
    }
    job["activations"] = names;
  }
  return job;
}

// The plan's step time against the run's, leaving out the first step (allocations, first reads).
void compare_with_plan(const Plan& plan, const std::vector<double>& step_seconds) {
  if (step_seconds.size() < 2) {
    std::fprintf(stderr, "plan: predicted %.3f s/step; too few steps to compare (the first is left out)\n",
                 plan.step_seconds);
    return;
  }
  double sum = 0;
  for (std::size_t i = 1; i < step_seconds.size(); ++i) sum += step_seconds[i];
  const double measured = sum / static_cast<double>(step_seconds.size() - 1);
  std::fprintf(stderr, "plan: predicted %.3f s/step, measured %.3f s/step (mean of the %zu steps after the first): "
               "measured / predicted = %.2f\n", plan.step_seconds, measured, step_seconds.size() - 1,
               measured / plan.step_seconds);
}

// The job's tokenizer: --tokenizer, else a Hugging Face model directory's own, else (a preset, the
// demo) ferry's byte tokenizer. Null when the model directory has none and every data file is
// tokenized already.
std::shared_ptr<const Tokenizer> job_tokenizer(const Json& job, bool needs_text) {
  const std::string setting = job["tokenizer"];
  const std::string model = job["model"];
  if (setting != "auto") return load_tokenizer(setting);
  if (!is_directory_name(model) || job["data"] == "demo") return byte_tokenizer();
  if (has_tokenizer(model)) return load_tokenizer(model);
  FERRY_CHECK(!needs_text, "model directory '", model, "' has no tokenizer: looked for ", model, "/tokenizer.json and ",
              model, "/tokenizer.model. Give --tokenizer PATH, or data already tokenized with the model's own ",
              "tokenizer (.bin, see `ferry tokenize --data`)");
  return nullptr;
}

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

struct JobData {
  std::shared_ptr<const Tokenizer> tokenizer;
  std::shared_ptr<const data::Dataset> train, eval;
  data::LoaderOptions train_options, eval_options;
  std::int64_t rows_per_epoch = 0;  // rows one pass over the training data fills
};

// Opens and checks the job's data before any weight is read: the tokenizer, every record
// tokenized, the warnings about truncation and positions.
JobData prepare_data(const Json& job, const models::ModelConfig& shape) {
  const std::string train_path = job["data"], eval_path = job["eval_data"];
  const bool demo = train_path == "demo";
  FERRY_CHECK(job["eval_every"].get<std::int64_t>() == 0 || !eval_path.empty(),
              "--eval-every needs --eval-data: the held-out data to evaluate on");
  const bool needs_text = (!demo && !ends_with(train_path, ".bin")) || (!eval_path.empty() && !ends_with(eval_path, ".bin"));
  JobData data;
  data.tokenizer = job_tokenizer(job, needs_text);
  if (data.tokenizer != nullptr) {
    FERRY_CHECK(data.tokenizer->vocab_size() <= shape.vocab_size, "the tokenizer (", data.tokenizer->kind(), ") has ",
                data.tokenizer->vocab_size(), " ids but the model's vocabulary is ", shape.vocab_size,
                ": give the model's own tokenizer with --tokenizer");
  }
  const std::int64_t seq = job["seq"];
  // Note: GPT-2 and OPT learn one embedding per position; past max_position_embeddings there is
  // none. Rotary models compute any position, though quality past the trained length is the model's.
  if (seq > shape.max_position_embeddings) {
    FERRY_CHECK(shape.family == models::Family::kLlama, "--seq ", seq, " exceeds ", shape.model_type,
                "'s max_position_embeddings ", shape.max_position_embeddings,
                ", which learns one embedding per position: give --seq ", shape.max_position_embeddings, " or less");
    std::fprintf(stderr, "warning: --seq %lld exceeds the model's max_position_embeddings %lld: positions past %lld "
                 "are beyond what it was trained on\n", static_cast<long long>(seq),
                 static_cast<long long>(shape.max_position_embeddings),
                 static_cast<long long>(shape.max_position_embeddings - 1));
  }
  data::TextOptions text;
  text.tokenizer = data.tokenizer;
  text.format = data::parse_data_format(job["data_format"]);
  text.chat_template = job["template"];

  data::LoaderOptions& options = data.train_options;
  options.batch_size = job["batch"];
  options.sequence_length = seq;
  options.seed = job["seed"];
  options.vocab_size = shape.vocab_size;
  options.answer_only = demo || job["answer_only"].get<bool>();
  if (data.tokenizer != nullptr) {
    const TokenizerInfo& info = data.tokenizer->info();
    options.pad_token = info.pad ? info.pad->id : info.eos ? info.eos->id : 0;
  }
  if (demo) {
    data.train = data::addition_dataset(data::AdditionTask{job["demo_digits"], job["seed"]}, data::Split::kTrain, 20000);
    options.pack = false;
    data.rows_per_epoch = data.train->size();
    return data;
  }
  data.train = data::open_dataset(train_path, seq, text);
  const bool token_file = ends_with(train_path, ".bin");
  if (token_file) check_token_ids(train_path, shape.vocab_size);
  const data::DatasetSummary summary = token_file ? data::DatasetSummary{} : data::summarize(*data.train, seq);
  // Packing by default for text; one example per row for data with prompts to mask.
  const bool instructions = summary.learned_tokens < summary.tokens;
  options.pack = job["pack"].is_boolean() ? job["pack"].get<bool>() : !instructions;
  // Note: a token file's examples are windows of --seq tokens, one row each, packed or not.
  data.rows_per_epoch = token_file || !options.pack ? data.train->size() : (summary.tokens + seq - 1) / seq;
  if (!token_file) {
    std::fprintf(stderr, "data: %s: %lld examples, %lld tokens (%lld learned%s), the longest %lld; %s; %s\n",
                 train_path.c_str(), static_cast<long long>(summary.examples), static_cast<long long>(summary.tokens),
                 static_cast<long long>(options.answer_only ? summary.learned_tokens : summary.tokens),
                 options.answer_only ? " answer-only" : "", static_cast<long long>(summary.longest),
                 options.pack ? "packed" : "one example per row", data.tokenizer->kind().c_str());
  }
  if (summary.longer_than > 0 && !options.pack) {
    std::fprintf(stderr, "warning: %lld of %lld examples are longer than --seq %lld (the longest has %lld tokens) and "
                 "are cut to %lld: raise --seq to keep them whole\n", static_cast<long long>(summary.longer_than),
                 static_cast<long long>(summary.examples), static_cast<long long>(seq),
                 static_cast<long long>(summary.longest), static_cast<long long>(seq));
  } else if (summary.longer_than > 0) {
    std::fprintf(stderr, "warning: %lld of %lld examples are longer than --seq %lld (the longest has %lld tokens): "
                 "packed, each continues in the next row, where it no longer sees its beginning\n",
                 static_cast<long long>(summary.longer_than), static_cast<long long>(summary.examples),
                 static_cast<long long>(seq), static_cast<long long>(summary.longest));
  }
  if (!eval_path.empty()) {
    data.eval = data::open_dataset(eval_path, seq, text);
    if (ends_with(eval_path, ".bin")) check_token_ids(eval_path, shape.vocab_size);
    data.eval_options = options;
    data.eval_options.shuffle = false;
    data.eval_options.single_pass = true;
    if (!ends_with(eval_path, ".bin")) {
      const data::DatasetSummary eval_summary = data::summarize(*data.eval, seq);
      if (eval_summary.longer_than > 0 && !options.pack) {
        std::fprintf(stderr, "warning: %lld of %lld eval examples are longer than --seq %lld and are cut to it\n",
                     static_cast<long long>(eval_summary.longer_than), static_cast<long long>(eval_summary.examples),
                     static_cast<long long>(seq));
      }
    }
  }
  return data;
}

// The run's length in optimizer steps: --steps, or --epochs passes over the data, each step
// reading `rows_per_step` rows (the global batch times the accumulation).
std::int64_t run_steps(const Json& job, std::int64_t rows_per_epoch, std::int64_t rows_per_step) {
  if (job["steps"] != "auto") return job["steps"];
  const double rows = job["epochs"].get<double>() * static_cast<double>(rows_per_epoch);
  return std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(rows / static_cast<double>(rows_per_step))));
}

void warn_about_warmup(const Json& job, const ScheduleConfig& schedule) {
  if (schedule.warmup_steps < schedule.total_steps) return;
  const std::string given = job["warmup"] == "auto" ? "--warmup-ratio " + job["warmup_ratio"].dump()
                                                    : "--warmup " + job["warmup"].dump();
  std::fprintf(stderr, "warning: %s gives %lld warm-up steps, not fewer than the run's %lld: the learning rate never "
               "reaches --lr; give fewer warm-up steps or a longer run\n", given.c_str(),
               static_cast<long long>(schedule.warmup_steps), static_cast<long long>(schedule.total_steps));
}

EvaluationResult run_evaluation(Engine& engine, const JobData& data) {
  data::DataLoader loader(data.eval, data.eval_options);
  return evaluate(engine, loader);
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  FERRY_CHECK(in.is_open(), "cannot read ", path, ": ", std::strerror(errno));
  std::ostringstream text;
  text << in.rdbuf();
  FERRY_CHECK(!in.bad(), "cannot read ", path, ": ", std::strerror(errno));
  return text.str();
}

// What the export needs beyond the weights to deploy: the tokenizer's files as the source has
// them, and generation_config.json (the source's, else one with the tokenizer's special ids).
// They go into the export's directory before it is swapped in, so the export is whole or absent.
struct ExportExtras {
  std::map<std::string, std::string> files;  // name -> contents
  std::vector<std::string> described;
};

ExportExtras export_extras(const std::string& model_dir, const Tokenizer* tokenizer) {
  ExportExtras extras;
  if (tokenizer != nullptr && !tokenizer->info().files.empty()) {
    const std::string source = fs::parent_directory(tokenizer->info().files.front());
    for (const std::string& name : tokenizer_file_names()) {
      if (!fs::exists(source + "/" + name)) continue;
      extras.files[name] = read_file(source + "/" + name);
      extras.described.push_back(name);
    }
  }
  const std::string generation = model_dir + "/generation_config.json";
  if (is_directory_name(model_dir) && fs::exists(generation)) {
    extras.files["generation_config.json"] = read_file(generation);
    extras.described.push_back("generation_config.json");
  } else if (is_directory_name(model_dir) && tokenizer != nullptr && tokenizer->info().eos) {
    const TokenizerInfo& info = tokenizer->info();
    Json config = {{"_from_model_config", true}};
    if (info.bos) config["bos_token_id"] = info.bos->id;
    config["eos_token_id"] = info.stop_ids.size() == 1 ? Json(info.stop_ids.front()) : Json(info.stop_ids);
    if (info.pad) config["pad_token_id"] = info.pad->id;
    extras.files["generation_config.json"] = config.dump(2) + "\n";
    extras.described.push_back("generation_config.json (written)");
  }
  return extras;
}

// Whether `path` lies inside directory `dir`.
bool is_inside(const std::string& path, const std::string& dir) {
  const std::string relative = fs::relative_path(path, dir);
  return relative != ".." && relative.rfind("../", 0) != 0;
}

volatile std::sig_atomic_t g_stop_requested = 0;

void request_stop(int) { g_stop_requested = 1; }

double demo_accuracy(Engine& engine, const data::AdditionTask& task, std::int64_t problems) {
  auto eval = data::addition_problems(task, data::Split::kEval, problems);
  return data::exact_match_accuracy(eval, [&](const std::vector<std::int64_t>& prompt,
                                               std::int64_t max_new_tokens) {
    return engine.generate(prompt, max_new_tokens, data::ByteTokenizer::kEos);
  });
}

int finetune(int argc, char** argv, const dist::World& world) {
  cxxopts::Options options(argv[0], "Fine-tune a model (no arguments: the built-in demo, a tiny model learning "
                                    "addition with the demo's own settings). Before reading any weights the job is "
                                    "checked and planned: the model's name, the data, the NVMe directories (present, "
                                    "writable, room for the plan), the budgets and the checkpoint to resume; the "
                                    "plan's step time is compared with the measured one at the end. Ends with a "
                                    "checkpoint and, with --export (default OUT/hf), the model as Hugging Face "
                                    "safetensors. SIGINT or SIGTERM saves a checkpoint and exits with 130; --resume "
                                    "auto continues from the latest. Defaults are for real jobs (docs/launcher.md, "
                                    "\"Defaults\"); with --mode zo2 they are optimizer sgd, weight decay 0 and no "
                                    "clipping. Under torchrun (RANK, WORLD_SIZE, ... in the environment) each rank "
                                    "trains on cuda:LOCAL_RANK with --batch rows of every step's global batch, and "
                                    "rank 0 writes the outputs (docs/distributed.md).");
  add_job_options(options);
  options.add_options("Job")("print-config", "print the job's settings, every default filled in, as JSON, and exit")(
      "h,help", "show this help");
  options.allow_unrecognised_options();
  auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << job_help(options, {}) << "\n";
    return 0;
  }

  const Json job = resolve_job(args, "finetune");
  if (args.count("print-config")) {
    Json printed = job;
    if (job["steps"] != "auto") printed["warmup"] = job_warmup_steps(job, job["steps"]);
    std::cout << printed.dump(2) << "\n";
    return 0;
  }
  const std::string out = job["out"];
  const bool demo = job["data"] == "demo";

  // Note: everything that can be checked without the weights is checked before they are read:
  // the model's name, the NVMe directories, the budgets (the plan) and the checkpoint to resume.
  const models::ModelConfig shape = model_shape(job);
  EngineConfig config = engine_config(job, shape.num_layers);
  const bool lead = world.rank == 0;  // writes the outputs and reports
  if (world.world_size > 1 && config.device.is_cuda() && !config.device.has_index()) {
    config.device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(world.local_rank));
  }
  // Joined before any check, so that a rank stopped by one (it exits, closing its connections)
  // stops the others at their next collective instead of at the rendezvous' timeout.
  std::shared_ptr<dist::Communicator> communicator;
  if (world.world_size > 1) communicator = dist::connect(world, dist::CommunicatorOptions{config.device});
  // The run directory next (rank 0's: it writes the outputs): a second job on it, or a new job
  // into an earlier run, is refused before anything else is read or written. Note: the job with
  // no --out at all (the demo into runs/demo) replaces its own earlier run, so that `ferry` runs
  // again as it is.
  std::optional<RunDirectory> run;
  std::vector<DirectoryLock> locks;
  if (lead) {
    RunOptions run_options;
    run_options.out = out;
    run_options.resume = job["resume"];
    run_options.overwrite = job["overwrite"].get<bool>() || (demo && args.count("out") == 0);
    run_options.keep_checkpoints = job["keep_checkpoints"];
    run.emplace(std::move(run_options));
    if (const auto& previous = run->lock().previous_holder()) {
      std::fprintf(stderr, "note: %s was locked by %s, which ended without releasing it: taken over\n", out.c_str(),
                   previous->describe().c_str());
    }
    if (!run->start_note().empty()) std::fprintf(stderr, "%s\n", run->start_note().c_str());
    // The staged layout and every NVMe directory stay locked for the whole job: calibration,
    // staging, fuyou's profiling engine and the job's engine.
    if (!config.staged.empty() && fs::is_directory(config.staged)) {
      locks.push_back(DirectoryLock::acquire(config.staged, "staged layout"));
    }
  }
  const std::string staged_manifest = config.staged + "/" + kStageManifestName;
  const bool staged_before = !config.staged.empty() && fs::exists(staged_manifest);
  // As the engine does, a staged job without NVMe directories of its own takes the layout's.
  if (staged_before && config.nvme_directories.empty()) {
    config.nvme_directories = read_nvme_layout(staged_manifest).directories;
  }
  check_nvme_directories(config.nvme_directories);
  if (lead) {
    for (const std::string& directory : config.nvme_directories) {
      locks.push_back(DirectoryLock::acquire(directory, "NVMe directory"));
    }
  }
  check_budgets(config);
  const Hardware hardware = agreed_hardware(args.count("hardware") ? args["hardware"].as<std::string>() : "",
                                            config.nvme_directories, communicator);
  // The store's NVMe tier runs with the I/O settings calibration measured fastest there.
  const NvmeIoSettings io = hardware.nvme_io_for(config.nvme_directories);
  if (config.nvme_queue_depth == 0) config.nvme_queue_depth = io.queue_depth;
  if (config.nvme_block_bytes == 0) config.nvme_block_bytes = io.block_bytes;
  Plan plan = make_plan(plan_request(job, config, shape, std::nullopt, hardware, world.world_size));
  require_fits(plan);
  const EngineConfig requested = config;
  if (config.mode == Mode::kAuto) config = plan_engine_config(plan);
  // A staged layout already holds the plan's NVMe bytes. fuyou's profiling step, which runs
  // before the job with every checkpoint on NVMe, may need more than the job.
  if (!staged_before) {
    std::uint64_t nvme_bytes = plan.tier_bytes[static_cast<int>(Tier::kNvme)];
    if (profiles_first(job, config) && config.mode == Mode::kFuyou) nvme_bytes = std::max(nvme_bytes, profiling_nvme_bytes(job, config, shape, hardware, world.world_size));
    check_nvme_room(config.nvme_directories, nvme_bytes);
  }
  std::string resume;
  if (run) {
    resume = run->resume_from();
  } else if (job["resume"] == "auto") {
    resume = latest_checkpoint(out);
  } else if (job["resume"] != "none") {
    resume = job["resume"];
  }
  if (!resume.empty()) check_resume_checkpoint(resume, shape, job["model"]);
  check_writable(out, "--out");
  const std::string export_dir = job["export"] == "auto" ? out + "/hf" : std::string(job["export"]);
  if (export_dir != "none") check_writable(export_dir, "--export");
  // An export outside the run directory is locked too (beside it: the export is swapped in whole).
  if (lead && export_dir != "none" && !is_inside(export_dir, out)) {
    locks.push_back(DirectoryLock::acquire_beside(export_dir, "export directory"));
  }
  for (const DirectoryLock& lock : locks) {
    if (const auto& previous = lock.previous_holder()) {
      std::fprintf(stderr, "note: %s was locked by %s, which ended without releasing it: taken over\n",
                   lock.directory().c_str(), previous->describe().c_str());
    }
  }
  if (lead) print_plan_summary(plan);
  JobData job_data = prepare_data(job, shape);
  // Every rank reads the global batch and keeps its rows: the examples of a step, and the
  // loader's position in a checkpoint, are those of one rank at the global batch.
  job_data.train_options.batch_size *= world.world_size;
  auto next_batch = [&](data::DataLoader& loader) { return data::rank_rows(loader.next(), world.rank, world.world_size); };
  const std::shared_ptr<const data::Dataset>& dataset = job_data.train;
  const data::LoaderOptions& loader_options = job_data.train_options;
  data::DataLoader loader(dataset, loader_options);
  data::AdditionTask task{job["demo_digits"], job["seed"]};
  const std::int64_t rows_per_step = loader_options.batch_size * config.grad_accumulation;
  const std::int64_t steps = run_steps(job, job_data.rows_per_epoch, rows_per_step);
  const double epochs = static_cast<double>(steps * rows_per_step) / static_cast<double>(job_data.rows_per_epoch);
  set_schedule(job, steps, &config);
  if (lead) warn_about_warmup(job, config.schedule);

  if (!config.staged.empty()) stage_if_needed(job["model"], config);
  // Note: a staged job's weights are on NVMe already; its model is allocated, never initialised.
  LayeredModel model = config.staged.empty() ? load_model(job)
                                             : models::allocate(staged_model_config(config.staged));

  if (profiles_first(job, requested)) {
    if (lead) {
      std::fprintf(stderr, "%s: profiling two steps %s (the second is measured), then planning again\n",
                   to_string(config.mode), config.mode == Mode::kFuyou ? "with every checkpoint on NVMe"
                                                                      : "of this placement, every block recomputed");
    }
    data::DataLoader sample_loader(dataset, loader_options);
    const data::Batch sample = next_batch(sample_loader);
    EngineConfig profiled = config;
    profiled.communicator = communicator;
    const MeasuredCompute measured = profile_compute(std::move(model), profiled, sample);
    // `ferry plan --profile OUT/profile.json` plans with what the job measured.
    if (run) write_file_durably(Env::posix(), out + "/profile.json", measured_compute_to_json(measured) + "\n");
    plan = make_plan(plan_request(job, requested, shape, measured, hardware, world.world_size));
    if (lead) std::fprintf(stderr, "%s\n", format_plan(plan).c_str());
    require_fits(plan);
    config = plan_engine_config(plan);
    set_schedule(job, steps, &config);
    model = load_model(job);
  }
  config.communicator = communicator;  // the plan's config runs without it
  if (world.world_size > 1) {
    if (lead) {
      std::fprintf(stderr, "data parallel: %d ranks over %s, %lld rows each of a global batch of %lld\n",
                   world.world_size, communicator->backend().c_str(),
                   static_cast<long long>(job["batch"].get<std::int64_t>()),
                   static_cast<long long>(loader_options.batch_size));
    }
  }
  Engine engine(std::move(model), config);
  if (!resume.empty()) {
    loader.restore(data::LoaderState::from_json(engine.load(resume)));
    if (lead) {
      std::fprintf(stderr, "resumed from %s at step %lld\n", resume.c_str(),
                   static_cast<long long>(engine.steps_taken()));
    }
  }
  std::int64_t last_saved_step = resume.empty() ? -1 : engine.steps_taken();
  if (run) {
    const std::int64_t dropped = run->begin(engine.steps_taken());
    if (dropped > 0) {
      std::fprintf(stderr, "metrics.jsonl: dropped %lld records past step %lld (of the run after the checkpoint)\n",
                   static_cast<long long>(dropped), static_cast<long long>(engine.steps_taken()));
    }
    write_file_durably(Env::posix(), out + "/config.json", resolved_job(job, config).dump(2) + "\n");
  }
  // Every rank stops at the same step when any of them is asked to (torchrun signals them all,
  // but not at the same moment): a collective of one number a step.
  auto stop_requested = [&] {
    if (world.world_size == 1) return static_cast<bool>(g_stop_requested);
    torch::Tensor flag = torch::tensor({g_stop_requested ? 1 : 0}, torch::kInt);
    communicator->all_reduce_sum(flag);
    return flag.item<int>() > 0;
  };

  if (lead) {
    std::fprintf(stderr,
                 "ferry finetune: %s, %lld parameters (%lld trainable), mode %s, %s on %s; %lld steps of %lld x %lld "
                 "tokens (%.2f epochs of %lld rows); %s lr %.3g, %lld warm-up steps\n",
                 std::string(job["model"]).c_str(), static_cast<long long>(engine.parameter_count()),
                 static_cast<long long>(engine.trainable_parameter_count()), to_string(config.mode),
                 to_string(config.precision), config.device.str().c_str(), static_cast<long long>(steps),
                 static_cast<long long>(loader_options.batch_size), static_cast<long long>(loader_options.sequence_length),
                 epochs, static_cast<long long>(job_data.rows_per_epoch), to_string(config.schedule.kind),
                 config.optimizer.lr, static_cast<long long>(config.schedule.warmup_steps));
  }
  const std::int64_t eval_problems = job["eval_problems"];
  if (lead && demo && engine.steps_taken() == 0) {
    std::fprintf(stderr, "exact-match accuracy before: %.1f%%\n",
                 100 * demo_accuracy(engine, task, eval_problems));
  }

  const std::int64_t first_step = engine.steps_taken();
  Progress progress(stderr, ::isatty(STDERR_FILENO) == 1, first_step, steps, job["log_every"]);
  // Each checkpoint once: the final one is skipped when the last step saved already.
  auto save = [&](const std::string& why) {
    if (last_saved_step == engine.steps_taken()) return;
    // Every rank saves (rank 0 writes, the others wait for it); rank 0 also points `latest` at it.
    std::string dir;
    if (run) {
      dir = run->save(engine, loader.state().to_json());
    } else {
      char name[32];
      std::snprintf(name, sizeof name, "step-%06lld", static_cast<long long>(engine.steps_taken()));
      dir = out + "/checkpoints/" + name;
      engine.save(dir, loader.state().to_json());
    }
    last_saved_step = engine.steps_taken();
    if (lead) progress.note("checkpoint (" + why + "): " + dir);
  };

  std::signal(SIGINT, request_stop);
  std::signal(SIGTERM, request_stop);
  const std::int64_t save_every = job["save_every"];
  const auto start = Clock::now();
  std::int64_t tokens = 0;
  StepResult last;
  std::vector<double> step_seconds;
  const std::int64_t eval_every = job["eval_every"];
  std::optional<EvaluationResult> last_eval;
  // Held-out loss, in metrics.jsonl beside the training records and on the progress line.
  auto evaluate_now = [&](std::int64_t step) {
    last_eval = run_evaluation(engine, job_data);
    run->log(Json{{"step", step}, {"eval_loss", last_eval->loss}, {"eval_perplexity", last_eval->perplexity},
                 {"eval_tokens", last_eval->tokens}, {"eval_batches", last_eval->batches}}
                .dump());
  };
  // Note: a non-finite loss (NaN or Inf weights, a diverged run) skips its step; after
  // max_nonfinite_losses of them in a row the job stops with an error and without saving, so the
  // latest checkpoint stays the last good one. No checkpoint is written while the latest loss is
  // not finite.
  const std::int64_t max_nonfinite_losses = job["max_nonfinite_losses"];
  std::int64_t nonfinite_losses = 0;  // in a row, up to the latest step
  auto stop_if_diverged = [&](bool at_end) {
    if (nonfinite_losses == 0 || (!at_end && nonfinite_losses < max_nonfinite_losses)) return;
    const std::int64_t last_step = engine.steps_taken();
    throw Error(detail::concat("the loss was not finite (NaN or Inf) at the last ", nonfinite_losses, " step",
                               nonfinite_losses == 1 ? "" : "s", " (to step ", last_step, "; max_nonfinite_losses = ",
                               max_nonfinite_losses, "): the job stops without saving, and ", out, "/checkpoints ",
                               "keeps the last good checkpoint. Check the model's weights for NaN or Inf, lower --lr (",
                               job["lr"].dump(), "), or with fp16 use bf16 or loss scaling"));
  };
  auto step_start = Clock::now();
  bool stopped = false;
  while (engine.steps_taken() < steps && !(stopped = stop_requested())) {
    auto result = engine.train_step(next_batch(loader));
    if (!result) continue;
    nonfinite_losses = std::isfinite(result->loss) ? 0 : nonfinite_losses + 1;
    step_seconds.push_back(std::chrono::duration<double>(Clock::now() - step_start).count());
    last = *result;
    tokens += result->tokens;
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    const double tokens_per_s = static_cast<double>(tokens) / elapsed;
    if (run) {
      run->log(Json{{"step", result->step},         {"loss", result->loss},
                    {"lr", result->lr},             {"grad_norm", result->grad_norm},
                    {"loss_scale", result->loss_scale}, {"skipped", result->skipped},
                    {"tokens", result->tokens},     {"tokens_per_s", tokens_per_s},
                    {"elapsed_s", elapsed}}
                   .dump());
    }
    if (lead && job_data.eval != nullptr && eval_every > 0 && result->step % eval_every == 0 && result->step < steps) {
      evaluate_now(result->step);
    }
    if (lead) {
      progress.step(result->step, result->loss, result->lr, tokens_per_s,
                    last_eval ? std::optional(last_eval->loss) : std::nullopt,
                    last_eval ? std::optional(last_eval->perplexity) : std::nullopt);
    }
    stop_if_diverged(false);
    if (save_every > 0 && result->step % save_every == 0) {
      if (nonfinite_losses == 0) {
        save("every " + std::to_string(save_every) + " steps");
      } else {
        progress.note("no checkpoint at step " + std::to_string(result->step) + ": its loss is not finite");
      }
    }
    step_start = Clock::now();
  }
  engine.flush();  // zo2 applies the last step's update (a no-op in the other modes)
  stop_if_diverged(/*at_end=*/true);
  if (stopped) {
    save("interrupted");
    return 130;
  }
  if (lead && job_data.eval != nullptr) {
    evaluate_now(engine.steps_taken());
    progress.note("");
    std::fprintf(stderr, "eval after %lld steps: loss %.4f, perplexity %.3f (%lld tokens of %s)\n",
                 static_cast<long long>(engine.steps_taken()), last_eval->loss, last_eval->perplexity,
                 static_cast<long long>(last_eval->tokens), std::string(job["eval_data"]).c_str());
  }
  save("final");
  if (export_dir != "none") {
    const Precision export_precision =
        job["export_precision"] == "auto" ? config.precision : parse_precision(job["export_precision"]);
    const ExportExtras export_files = export_extras(job["model"], job_data.tokenizer.get());
    engine.export_pretrained(export_dir, export_precision, export_files.files);
    if (lead) {
      std::string extras;
      for (const std::string& name : export_files.described) extras += (extras.empty() ? "" : ", ") + name;
      std::fprintf(stderr, "exported the model (%s, Hugging Face safetensors%s%s%s): %s\n",
                   to_string(export_precision), shape.lora.enabled() ? ", the adapters merged" : "",
                   extras.empty() ? "" : "; ", extras.c_str(), export_dir.c_str());
    }
  }
  // Note: every rank calls the exports (rank 0 writes, the others wait for it to succeed).
  const std::string adapter_dir = job["adapter"] == "auto" ? out + "/adapter" : std::string(job["adapter"]);
  if (shape.lora.enabled() && adapter_dir != "none") {
    engine.export_adapter(adapter_dir, job["model"]);
    if (lead) {
      std::fprintf(stderr, "exported the LoRA adapters (PEFT's adapter_config.json and adapter_model.safetensors): %s\n",
                   adapter_dir.c_str());
    }
  }
  if (!lead) return 0;
  if (demo) {
    std::fprintf(stderr, "exact-match accuracy after %lld steps: %.1f%% (final loss %.4f)\n",
                 static_cast<long long>(engine.steps_taken()),
                 100 * demo_accuracy(engine, task, eval_problems), last.loss);
  }
  if (config.trace) {
    std::fprintf(stderr, "trace: %s\n  %s\n", std::string(job["trace"]).c_str(),
                 engine.write_trace(job["trace"]).c_str());
  }
  EngineStats stats = engine.stats();
  std::fprintf(stderr, "time: forward %.1f s, backward %.1f s, optimizer %.1f s (waited %.1f s)\n",
               stats.forward_seconds, stats.backward_seconds, stats.optimizer_seconds,
               stats.optimizer_wait_seconds);
  compare_with_plan(plan, step_seconds);
  std::fprintf(stderr, "outputs: %s/metrics.jsonl, %s/config.json, %s/checkpoints/\n", out.c_str(),
               out.c_str(), out.c_str());
  return 0;
}

// Under torchrun an error names the rank it happened on.
int run_finetune(int argc, char** argv) {
  const dist::World world = dist::World::from_environment();
  if (world.world_size == 1) return finetune(argc, argv, world);
  try {
    return finetune(argc, argv, world);
  } catch (const std::exception& error) {
    throw Error(detail::concat("rank ", world.rank, " of ", world.world_size, ": ", error.what()));
  }
}

}  // namespace

FERRY_CLI_COMMAND("finetune", "fine-tune a model (no arguments: the built-in demo job)", run_finetune);

}  // namespace ferry::cli
