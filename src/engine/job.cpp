#include "ferry/job.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <sstream>

#include "ferry/check.h"
#include "ferry/memory.h"
#include "ferry/zo.h"

namespace ferry {
namespace {

using Json = nlohmann::json;

constexpr double kMaxInteger = 9223372036854775807.0;  // 2^63 - 1, as the table's bound
constexpr double kInfinity = std::numeric_limits<double>::infinity();

JobSetting integer(std::string key, Json default_value, double low, double high = kMaxInteger) {
  JobSetting setting;
  setting.key = std::move(key);
  setting.default_value = std::move(default_value);
  setting.kind = JobSettingKind::kInteger;
  setting.low = low;
  setting.high = high;
  return setting;
}

JobSetting number(std::string key, Json default_value, double low, double high = kInfinity) {
  JobSetting setting = integer(std::move(key), std::move(default_value), low, high);
  setting.kind = JobSettingKind::kNumber;
  return setting;
}

JobSetting positive(std::string key, Json default_value) {
  JobSetting setting = number(std::move(key), std::move(default_value), 0);
  setting.low_open = true;
  return setting;
}

// A rate or a moment decay: 0 <= x < 1.
JobSetting fraction(std::string key, Json default_value) {
  JobSetting setting = number(std::move(key), std::move(default_value), 0, 1);
  setting.high_open = true;
  return setting;
}

JobSetting of_kind(JobSettingKind kind, std::string key, Json default_value) {
  JobSetting setting;
  setting.key = std::move(key);
  setting.default_value = std::move(default_value);
  setting.kind = kind;
  return setting;
}

JobSetting boolean(std::string key, Json default_value) { return of_kind(JobSettingKind::kBoolean, std::move(key), std::move(default_value)); }
JobSetting bytes(std::string key, Json default_value) { return of_kind(JobSettingKind::kBytes, std::move(key), std::move(default_value)); }
JobSetting text(std::string key, Json default_value) { return of_kind(JobSettingKind::kText, std::move(key), std::move(default_value)); }

JobSetting or_words(JobSetting setting, std::vector<std::string> words) {
  setting.words = std::move(words);
  return setting;
}

JobSetting text_or_list(std::string key, Json default_value) {
  JobSetting setting = text(std::move(key), std::move(default_value));
  setting.list = true;
  return setting;
}

// A job-file key without a flag: an engine setting whose default is the engine's.
JobSetting file_only(JobSetting setting) {
  setting.flag = false;
  return setting;
}

// The table's rows, each under the group it follows. Note: a null default marks a setting whose
// default is the engine's own; every engine setting (engine_config_keys) is in the table, and
// every setting has a group and help (tests check both).
class TableBuilder {
 public:
  void group(std::string name) { group_ = std::move(name); }
  void add(JobSetting setting, std::string help) {
    setting.group = group_;
    setting.help = std::move(help);
    settings_.push_back(std::move(setting));
  }
  std::vector<JobSetting> take() { return std::move(settings_); }

 private:
  std::string group_;
  std::vector<JobSetting> settings_;
};

std::vector<JobSetting> make_settings() {
  const Json none = nullptr;
  TableBuilder table;
  table.group("Model");
  table.add(text("model", "tiny-llama"), "a preset (llama-7b, opt-13b, ...; an unknown name is refused with the list) "
                                          "or a Hugging Face model directory");
  table.add(integer("layers", 0, 0), "a preset's first N blocks only, every other dimension kept (0: all)");
  table.add(or_words(fraction("dropout", "auto"), {"auto"}), "a rate for every dropout of the model (auto: config.json's)");
  table.add(integer("seed", 1, 0), "seeds a preset's initialisation, the data order, dropout and zo2's perturbations");
  table.add(text("tokenizer", "auto"), "a directory, tokenizer.json or tokenizer.model (auto: the model directory's, or "
                                       "the byte tokenizer for a preset)");

  table.group("Data");
  table.add(text("data", "demo"), "training data: .jsonl/.json records, text, or a .bin token file (demo: the built-in "
                                  "addition task, with the demo's own settings)");
  table.add(text("data_format", "auto"), "how records read: auto (by their keys), text, prompt-completion, alpaca, "
                                         "messages or sharegpt");
  table.add(text("template", ""), "chat template: chatml, qwen2, llama3, llama2, mistral, mistral-v0.1 or plain (empty: "
                                  "the model's own when it is one of these, else plain)");
  table.add(boolean("answer_only", true), "learn only the answers (completions, assistant turns) of instruction and "
                                          "chat data");
  table.add(or_words(boolean("pack", "auto"), {"auto"}), "concatenate examples into full rows (auto: for text and token "
                                                         "files, not for instruction data); also --pack / --no-pack");
  table.add(integer("batch", 8, 1), "sequences per micro-batch, per rank");
  table.add(integer("seq", 1024, 1), "tokens per sequence");
  table.add(text("eval_data", ""), "held-out data (any format) for the eval loss and perplexity");
  table.add(integer("eval_every", 0, 0), "evaluate every N steps (0: at the end only)");
  table.add(integer("demo_digits", 1, 1, 9), "the demo's addition problems: up to this many digits per number");
  table.add(integer("eval_problems", 100, 1), "the demo's exact-match accuracy: problems asked before and after");

  table.group("Optimization");
  table.add(or_words(integer("steps", "auto", 1), {"auto"}), "optimizer steps of the run (auto: --epochs over the data)");
  table.add(positive("epochs", 1.0), "passes over the training data when --steps is auto (a fraction is fine)");
  table.add(text("optimizer", "adamw"), "adamw, adam, sgd or adagrad");
  table.add(or_words(number("lr", "auto", 0), {"auto"}), "peak learning rate (auto: the optimizer family's: AdamW 5e-5, "
                                                          "2e-4 with LoRA; SGD 1e-2; zo2 1e-7, 1e-4 with LoRA)");
  table.add(text("schedule", "cosine"), "learning-rate schedule after warm-up: constant, linear or cosine");
  table.add(or_words(integer("warmup", "auto", 0), {"auto"}), "warm-up steps, linear from 0 to lr (auto: --warmup-ratio "
                                                               "of the run)");
  table.add(fraction("warmup_ratio", 0.03), "warm-up as a fraction of the run's steps, when --warmup is auto");
  table.add(number("min_lr_ratio", 0.1, 0, 1), "the decay's floor, as a fraction of lr");
  table.add(number("weight_decay", 0.01, 0), "decoupled weight decay (AdamW), or L2 (the others)");
  table.add(number("momentum", 0.0, 0), "SGD momentum (a state per parameter when above 0)");
  table.add(number("max_grad_norm", 1.0, 0), "clip the global gradient norm to this (0: no clipping)");
  table.add(integer("grad_accum", 1, 1), "micro-batches per optimizer step");
  table.add(text("precision", "auto"), "compute precision: fp32, bf16, fp16 (with loss scaling) or auto (bf16 on a "
                                       "CUDA device, fp32 on the CPU)");
  table.add(integer("max_nonfinite_losses", 3, 1), "stop with an error after this many non-finite losses in a row, "
                                                    "keeping the last good checkpoint");
  table.add(file_only(fraction("beta1", none)), "Adam's first-moment decay (engine default 0.9)");
  table.add(file_only(fraction("beta2", none)), "Adam's second-moment decay (engine default 0.999)");
  table.add(file_only(positive("eps", none)), "Adam's epsilon (engine default 1e-8)");
  table.add(file_only(boolean("nesterov", none)), "Nesterov momentum for SGD");
  {
    JobSetting loss_scale = file_only(boolean("loss_scale", none));
    loss_scale.nullable = true;
    table.add(loss_scale, "dynamic loss scaling (null: on for fp16 only)");
  }

  table.group("LoRA");
  table.add(integer("lora_rank", 0, 0), "LoRA adapters of this rank on the blocks' linears, the base frozen (0: train "
                                        "every parameter)");
  table.add(positive("lora_alpha", 8.0), "LoRA's alpha: the adapters' output is scaled by alpha / rank");
  table.add(fraction("lora_dropout", 0.0), "dropout on the adapters' input");
  table.add(text_or_list("lora_targets", "all-linear"), "the linears to adapt: PEFT target_modules names (q_proj, ...), "
                                                        "ferry's short ones (q, k, v, o, gate, up, down) or all-linear, "
                                                        "comma-separated");
  table.add(text("base_storage", "compute"), "the frozen base's storage: compute (the compute precision) or fp8 (e4m3, "
                                             "a scale per output channel)");

  table.group("Memory and offload");
  table.add(text("mode", "zero-offload"), "gpu, zero-offload, fuyou, auto (the planner places every part by the budgets) "
                                          "or zo2 (zeroth-order)");
  table.add(text("device", "auto"), "auto (cuda when there is one, else cpu), cpu, cuda or cuda:N");
  table.add(bytes("gpu_budget", "0"), "GPU memory the job may use, bytes or 24GiB (0: the whole device)");
  table.add(bytes("host_budget", "0"), "pinned host memory the job may use (0: no limit but the machine's)");
  table.add(text_or_list("nvme", ""), "NVMe directories, comma-separated; the job's files are striped over them");
  table.add(bytes("nvme_budget", "0"), "NVMe bytes the job may use (0: the directories' free space)");
  table.add(text_or_list("activations", "auto"), "per block: gpu, host or nvme (a checkpoint's tier) or graph (kept, no "
                                                 "recomputation); one for all or a comma list (auto: gpu, or fuyou's "
                                                 "plan)");
  table.add(integer("keep_graph_blocks", 0, 0), "gpu and zero-offload: blocks that keep their autograd graph instead of "
                                                "recomputing");
  table.add(text("micro_batch_order", "auto"), "with --grad-accum above 1: batch-major, layer-major (each block once per "
                                               "step) or auto (the plan's choice)");
  table.add(or_words(integer("fuyou_host_blocks", "auto", 0), {"auto"}), "fuyou: blocks whose parameters live in host "
                                                                          "memory (auto: the plan's choice)");
  table.add(integer("fuyou_window", 3, 2), "fuyou: blocks on the device at once");
  table.add(boolean("delayed_update", false), "zero-offload: step t's CPU update overlaps step t+1's compute (one step "
                                              "stale)");
  table.add(integer("delayed_update_warmup", 0, 0), "zero-offload: ordinary steps before the first delayed one");
  table.add(text("staged", ""), "a directory `ferry stage` filled with the job's NVMe layout (staged once, resumed "
                                "from there)");
  table.add(file_only(bytes("gpu_working", none)), "GPU bytes set aside for activations and scratch (default: the plan's)");
  table.add(file_only(boolean("offload_checkpoints", none)), "gpu and zero-offload: activation checkpoints in host memory");
  table.add(file_only(integer("optimizer_threads", none, 0, 4096)), "threads of the CPU optimizer (0: every core)");
  table.add(file_only(integer("nvme_queue_depth", none, 0, 65536)), "I/O requests in flight per directory (0: "
                                                                    "calibration's best)");
  table.add(file_only(bytes("nvme_block", none)), "bytes per I/O request (0: calibration's best)");
  table.add(file_only(of_kind(JobSettingKind::kObject, "placement", none)), "a placement: every part's home tier per "
                                                                           "role (docs/placement.md)");

  table.group("zo2");
  table.add(positive("zo_eps", 1e-3), "the perturbation's scale");
  table.add(integer("zo_samples", 1, 1, optim::kMaxZoSamples), "perturbations averaged per step");
  table.add(text("zo_blocks", "host"), "where the blocks live: gpu, host or nvme");
  table.add(or_words(integer("zo_gpu_blocks", "0", 0), {"auto"}), "blocks resident on the device, spread evenly (auto: "
                                                                   "as many as the GPU budget holds)");
  table.add(integer("zo_host_blocks", 0, 0), "with --zo-blocks nvme: blocks kept in host memory");
  table.add(text("zo_storage", ""), "the stored weights' precision (empty: the compute precision)");
  table.add(text("zo_transfer", "storage"), "what crosses PCIe: storage, bf16 or fp8");
  table.add(integer("zo_window", 3, 2), "blocks on the device at once");
  table.add(integer("zo_write_back", 4, 1, optim::kMaxZoUpdates), "a streamed block goes home every N steps");

  table.group("Checkpoints and export");
  table.add(text("out", "runs/job"), "the run directory: metrics.jsonl, config.json, checkpoints/ (the demo's: "
                                     "runs/demo)");
  table.add(text("resume", "none"), "none (a new run), auto (the latest checkpoint under --out) or a checkpoint "
                                    "directory");
  table.add(boolean("overwrite", false), "a new run into an --out holding an earlier one replaces it instead of being "
                                         "refused (--overwrite alone means true)");
  table.add(integer("save_every", 0, 0), "save a checkpoint every N steps (0: at the end only)");
  table.add(integer("keep_checkpoints", 0, 0), "keep the newest N checkpoints, never the one `latest` names (0: all)");
  table.add(text("verify", "auto"), "check what is read back against its checksums: full, sampled, none or auto (full "
                                    "up to 32 GiB, sampled above and for a staged layout)");
  table.add(text("export", "auto"), "the trained model as Hugging Face safetensors (auto: OUT/hf; none: no export)");
  table.add(text("export_precision", "auto"), "the export's weights: fp32, bf16, fp16 or auto (the compute precision)");
  table.add(text("adapter", "auto"), "the LoRA adapters as a PEFT directory (auto: OUT/adapter; none: not exported)");

  table.group("Logging");
  table.add(integer("log_every", 10, 1), "off a terminal, a progress line every N steps (a terminal's is redrawn at "
                                         "most twice a second)");
  table.add(text("trace", ""), "write a Chrome trace of the engine's work to this file");
  return table.take();
}

std::string format_bound(double value, JobSettingKind kind) {
  if (kind == JobSettingKind::kInteger) return std::to_string(static_cast<long long>(value));
  std::ostringstream text;
  text << value;
  return text.str();
}

std::string kind_phrase(const JobSetting& setting) {
  switch (setting.kind) {
    case JobSettingKind::kInteger:
    case JobSettingKind::kNumber: {
      const bool integers = setting.kind == JobSettingKind::kInteger;
      const std::string noun = integers ? "an integer" : "a number";
      const bool bounded_above = integers ? setting.high < kMaxInteger : std::isfinite(setting.high);
      const std::string low = format_bound(setting.low, setting.kind), high = format_bound(setting.high, setting.kind);
      if (!bounded_above) return noun + (setting.low_open ? " > " : " >= ") + low;
      if (integers) return noun + " from " + low + " to " + high;
      return noun + " in " + (setting.low_open ? "(" : "[") + low + ", " + high + (setting.high_open ? ")" : "]");
    }
    case JobSettingKind::kBoolean: return "true or false";
    case JobSettingKind::kBytes: return "a size such as 4096, 512MiB or 24GiB (0: no limit), below 2^63 bytes";
    case JobSettingKind::kText: return setting.list ? "text, or a list of texts" : "text";
    case JobSettingKind::kObject: return "a mapping (see docs/placement.md)";
  }
  return "";
}

// The integer `text` holds, else why it holds none. Note: an exponent is read exactly when it
// gives a whole number ("1e2" is 100); a fraction, trailing text or 2^63 and beyond are refused,
// never truncated.
bool integer_from_text(const std::string& text, std::int64_t* value, std::string* why) {
  const char* begin = text.c_str();
  char* end = nullptr;
  errno = 0;
  const long long integer = std::strtoll(begin, &end, 10);
  if (end != begin && *end == '\0') {
    if (errno == ERANGE) {
      *why = "beyond 2^63";
      return false;
    }
    *value = integer;
    return true;
  }
  const double number = std::strtod(begin, &end);
  if (end == begin || *end != '\0' || !std::isfinite(number)) {
    *why = "not an integer";
  } else if (number != std::floor(number)) {
    *why = "not a whole number";
  } else if (std::fabs(number) >= 9223372036854775808.0) {
    *why = "beyond 2^63";
  } else {
    *value = static_cast<std::int64_t>(number);
    return true;
  }
  return false;
}

bool number_from_text(const std::string& text, double* value) {
  const char* begin = text.c_str();
  char* end = nullptr;
  *value = std::strtod(begin, &end);
  return end != begin && *end == '\0' && std::isfinite(*value);
}

[[noreturn]] void refuse(const JobSetting& setting, const std::string& where, const std::string& why = "") {
  throw Error(detail::concat(where, " is invalid", why.empty() ? "" : ": " + why, ": ", setting.key, " must be ",
                             job_setting_range(setting.key)));
}

bool in_range(const JobSetting& setting, double value) {
  const bool above_low = setting.low_open ? value > setting.low : value >= setting.low;
  const bool below_high = setting.high_open ? value < setting.high : value <= setting.high;
  return std::isfinite(value) && above_low && below_high;
}

Json read_integer(const JobSetting& setting, const Json& value, const std::string& where) {
  std::int64_t integer = 0;
  if (value.is_number_unsigned()) {
    if (value.get<std::uint64_t>() > static_cast<std::uint64_t>(kMaxInteger)) refuse(setting, where, "2^63 or more");
    integer = value.get<std::int64_t>();
  } else if (value.is_number_integer()) {
    integer = value.get<std::int64_t>();
  } else if (value.is_number_float()) {
    const double number = value.get<double>();
    if (!std::isfinite(number) || number != std::floor(number)) refuse(setting, where, "not a whole number");
    if (std::fabs(number) >= 9223372036854775808.0) refuse(setting, where, "beyond 2^63");
    integer = static_cast<std::int64_t>(number);
  } else if (value.is_string()) {
    std::string why;
    if (!integer_from_text(value.get<std::string>(), &integer, &why)) refuse(setting, where, why);
  } else {
    refuse(setting, where);
  }
  if (!in_range(setting, static_cast<double>(integer))) refuse(setting, where);
  return integer;
}

Json read_number(const JobSetting& setting, const Json& value, const std::string& where) {
  double number = 0;
  if (value.is_number()) {
    number = value.get<double>();
  } else if (value.is_string()) {
    if (!number_from_text(value.get<std::string>(), &number)) refuse(setting, where, "not a number");
  } else {
    refuse(setting, where);
  }
  if (!in_range(setting, number)) refuse(setting, where);
  return number;
}

// Edits from a to b: insertions, deletions, substitutions and swaps of neighbours (the optimal
// string alignment distance), for "did you mean".
std::size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::vector<std::size_t>> d(a.size() + 1, std::vector<std::size_t>(b.size() + 1));
  for (std::size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (std::size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    for (std::size_t j = 1; j <= b.size(); ++j) {
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.size()][b.size()];
}

}  // namespace

const std::vector<JobSetting>& job_settings() {
  static const std::vector<JobSetting> kSettings = make_settings();
  return kSettings;
}

const std::vector<std::string>& job_setting_groups() {
  static const std::vector<std::string> kGroups = [] {
    std::vector<std::string> groups;
    for (const JobSetting& setting : job_settings()) {
      if (std::find(groups.begin(), groups.end(), setting.group) == groups.end()) groups.push_back(setting.group);
    }
    return groups;
  }();
  return kGroups;
}

const JobSetting* find_job_setting(const std::string& key) {
  for (const JobSetting& setting : job_settings()) {
    if (setting.key == key) return &setting;
  }
  return nullptr;
}

std::string job_setting_range(const std::string& key) {
  const JobSetting* setting = find_job_setting(key);
  FERRY_ASSERT(setting != nullptr, "job_setting_range of unknown setting ", key);
  std::string words;
  for (const std::string& word : setting->words) words += word + " or ";
  if (setting->nullable) words += "null or ";
  return words + kind_phrase(*setting);
}

const Json& job_defaults() {
  static const Json kDefaults = [] {
    Json defaults = Json::object();
    for (const JobSetting& setting : job_settings()) {
      if (!setting.default_value.is_null()) defaults[setting.key] = setting.default_value;
    }
    return defaults;
  }();
  return kDefaults;
}

const Json& demo_job_defaults() {
  static const Json kDefaults = {{"precision", "fp32"}, {"batch", 32}, {"seq", 16},
                                 {"steps", 400}, {"lr", 3e-3}, {"warmup", 20}, {"out", "runs/demo"}};
  return kDefaults;
}

const Json& zo2_job_defaults() {
  static const Json kDefaults = {{"max_grad_norm", 0.0}, {"optimizer", "sgd"}, {"weight_decay", 0.0}};
  return kDefaults;
}

double job_default_lr(const std::string& mode, const std::string& optimizer, bool lora) {
  if (mode == "zo2") return lora ? 1e-4 : 1e-7;
  if (optimizer == "adamw" || optimizer == "adam") return lora ? 2e-4 : 5e-5;
  return 1e-2;
}

void check_job_setting_names(const Json& values, const std::string& origin) {
  std::vector<std::string> names;
  for (const JobSetting& setting : job_settings()) names.push_back(setting.key);
  std::sort(names.begin(), names.end());
  for (const auto& item : values.items()) {
    if (find_job_setting(item.key()) != nullptr) continue;
    const std::string hint = did_you_mean(item.key(), names);
    std::string valid;
    for (const std::string& name : names) valid += (valid.empty() ? "" : ", ") + name;
    throw Error(detail::concat("unknown setting '", item.key(), "'", origin.empty() ? "" : " in " + origin, hint,
                               hint.empty() ? "; valid settings: " + valid : ""));
  }
}

Json complete_job(const Json& given) {
  FERRY_CHECK(given.is_object(), "a job's settings must be a mapping of setting names to values; got ", given.dump());
  check_job_setting_names(given, "");
  // Two ways of saying one thing: one of them, or neither.
  for (const auto& [count, ratio] : {std::pair{"steps", "epochs"}, std::pair{"warmup", "warmup_ratio"}}) {
    FERRY_CHECK(!(given.contains(count) && given[count] != "auto" && given.contains(ratio)), count, " = ",
                given.value(count, Json()).dump(), " and ", ratio, " = ", given.value(ratio, Json()).dump(),
                " both set the ", count == std::string("steps") ? "run's length" : "warm-up", ": give one of them");
  }
  Json job = job_defaults();
  const auto overlay = [&](const Json& defaults) {
    for (const auto& [key, value] : defaults.items()) job[key] = value;
  };
  // Note: the demo is the default job exactly, the demo's data on the demo's model; a model of
  // the user's on the demo data is a real job.
  const auto setting = [&](const char* key) -> const Json& { return given.contains(key) ? given[key] : job[key]; };
  if (setting("data") == "demo" && setting("model") == job_defaults()["model"]) overlay(demo_job_defaults());
  if (setting("mode") == "zo2") overlay(zo2_job_defaults());
  for (const auto& [key, value] : given.items()) job[key] = value;
  // An overlay's count gives way to the ratio given in its place (the demo's 400 steps to --epochs).
  if (given.contains("epochs") && !given.contains("steps")) job["steps"] = "auto";
  if (given.contains("warmup_ratio") && !given.contains("warmup")) job["warmup"] = "auto";
  if (job["lr"] == "auto") {
    const bool lora = job["lora_rank"].is_number() && job["lora_rank"].get<double>() > 0;
    job["lr"] = job_default_lr(job["mode"].is_string() ? job["mode"].get<std::string>() : "",
                               job["optimizer"].is_string() ? job["optimizer"].get<std::string>() : "", lora);
  }
  return job;
}

std::int64_t job_warmup_steps(const Json& job, std::int64_t total_steps) {
  if (job["warmup"] != "auto") return job["warmup"].get<std::int64_t>();
  return static_cast<std::int64_t>(std::ceil(job["warmup_ratio"].get<double>() * static_cast<double>(total_steps)));
}

Json read_job_setting(const std::string& key, const Json& value, const std::string& where) {
  const JobSetting* setting = find_job_setting(key);
  FERRY_ASSERT(setting != nullptr, "read_job_setting of unknown setting ", key);
  if (value.is_null() && setting->nullable) return value;
  if (value.is_string() && std::find(setting->words.begin(), setting->words.end(), value.get<std::string>()) !=
                               setting->words.end()) {
    return value;
  }
  switch (setting->kind) {
    case JobSettingKind::kInteger: return read_integer(*setting, value, where);
    case JobSettingKind::kNumber: return read_number(*setting, value, where);
    case JobSettingKind::kBoolean:
      if (value.is_boolean()) return value;
      if (value == "true" || value == "false") return value == "true";
      refuse(*setting, where);
    case JobSettingKind::kBytes:
      if (value.is_string()) {
        try {
          parse_bytes(value.get<std::string>());
        } catch (const Error& error) {
          refuse(*setting, where, error.what());
        }
        return value;
      }
      if (value.is_number_integer() && value.get<double>() >= 0 && value.get<double>() < 9223372036854775808.0) {
        return value;
      }
      if (value.is_number_float()) return read_job_setting(key, value.dump(), where);
      refuse(*setting, where);
    case JobSettingKind::kText: {
      const bool texts = value.is_array() && std::all_of(value.begin(), value.end(),
                                                           [](const Json& item) { return item.is_string(); });
      if (value.is_string() || (setting->list && texts)) return value;
      // A trace is named by a file, or switched on by true.
      if (key == "trace" && value.is_boolean()) return value;
      refuse(*setting, where);
    }
    case JobSettingKind::kObject:
      if (value.is_object()) return value;
      refuse(*setting, where);
  }
  refuse(*setting, where);
}

std::int64_t parse_integer(const std::string& text, const std::string& what, std::int64_t low, std::int64_t high) {
  std::int64_t value = 0;
  std::string why = "out of range";
  FERRY_CHECK(integer_from_text(text, &value, &why) && value >= low && value <= high, what, " ", text,
              " is invalid: ", why, ": give an integer from ", low, " to ", high);
  return value;
}

double parse_number(const std::string& text, const std::string& what) {
  double value = 0;
  FERRY_CHECK(number_from_text(text, &value), what, " ", text, " is invalid: not a number: give a finite number ",
              "such as 3e-4 or 0.1");
  return value;
}

bool parse_boolean(const std::string& text, const std::string& what) {
  FERRY_CHECK(text == "true" || text == "false", what, " ", text, " is invalid: give true or false");
  return text == "true";
}

std::string did_you_mean(const std::string& name, const std::vector<std::string>& names) {
  const std::string* best = nullptr;
  std::size_t best_distance = 0;
  for (const std::string& candidate : names) {
    const std::size_t distance = edit_distance(name, candidate);
    if (best == nullptr || distance < best_distance) {
      best = &candidate;
      best_distance = distance;
    }
  }
  // A near miss: a typo or two, and not most of the name.
  const bool near = best != nullptr && best_distance > 0 && best_distance <= 2 && best_distance * 3 <= name.size();
  return near ? " (did you mean '" + *best + "'?)" : "";
}

}  // namespace ferry
