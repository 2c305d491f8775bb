#include "cli/settings.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <sstream>

#include "ferry/check.h"
#include "ferry/memory.h"
#include "ferry/zo.h"

namespace ferry::cli {
namespace {

using Json = nlohmann::json;

constexpr double kMaxInteger = 9223372036854775807.0;  // 2^63 - 1, as the table's bound
constexpr double kInfinity = std::numeric_limits<double>::infinity();

Setting integer(std::string key, Json default_value, double low, double high = kMaxInteger) {
  Setting setting;
  setting.key = std::move(key);
  setting.default_value = std::move(default_value);
  setting.kind = SettingKind::kInteger;
  setting.low = low;
  setting.high = high;
  return setting;
}

Setting number(std::string key, Json default_value, double low, double high = kInfinity) {
  Setting setting = integer(std::move(key), std::move(default_value), low, high);
  setting.kind = SettingKind::kNumber;
  return setting;
}

Setting positive(std::string key, Json default_value) {
  Setting setting = number(std::move(key), std::move(default_value), 0);
  setting.low_open = true;
  return setting;
}

// A rate or a moment decay: 0 <= x < 1.
Setting fraction(std::string key, Json default_value) {
  Setting setting = number(std::move(key), std::move(default_value), 0, 1);
  setting.high_open = true;
  return setting;
}

Setting of_kind(SettingKind kind, std::string key, Json default_value) {
  Setting setting;
  setting.key = std::move(key);
  setting.default_value = std::move(default_value);
  setting.kind = kind;
  return setting;
}

Setting boolean(std::string key, Json default_value) { return of_kind(SettingKind::kBoolean, std::move(key), std::move(default_value)); }
Setting bytes(std::string key, Json default_value) { return of_kind(SettingKind::kBytes, std::move(key), std::move(default_value)); }
Setting text(std::string key, Json default_value) { return of_kind(SettingKind::kText, std::move(key), std::move(default_value)); }

Setting or_words(Setting setting, std::vector<std::string> words) {
  setting.words = std::move(words);
  return setting;
}

Setting text_or_list(std::string key, Json default_value) {
  Setting setting = text(std::move(key), std::move(default_value));
  setting.list = true;
  return setting;
}

Setting helped(Setting setting, std::string help) {
  setting.help = std::move(help);
  return setting;
}

// Note: a null default marks a job-file setting without a flag: the engine's own default holds
// unless the file sets it. Every engine setting (engine_config_keys) is in the table; a test
// checks that.
std::vector<Setting> make_settings() {
  const Json none = nullptr;
  return {
      text("model", "tiny-llama"),
      text("data", "demo"),
      text("mode", "zero-offload"),
      text("precision", "fp32"),
      text("device", "auto"),
      bytes("gpu_budget", "0"),
      bytes("host_budget", "0"),
      integer("steps", 400, 1),
      integer("batch", 32, 1),
      integer("seq", 16, 1),
      number("lr", 3e-3, 0),
      text("schedule", "cosine"),
      integer("warmup", 20, 0),
      number("min_lr_ratio", 0.1, 0, 1),
      text("optimizer", "adamw"),
      number("weight_decay", 0.01, 0),
      integer("grad_accum", 1, 1),
      number("max_grad_norm", 1.0, 0),
      integer("keep_graph_blocks", 0, 0),
      integer("seed", 1, 0),
      text("out", "runs/demo"),
      text("resume", "none"),
      helped(integer("save_every", 0, 0), "save a checkpoint every N steps (0: at the end only); "),
      integer("eval_problems", 100, 1),
      helped(integer("log_every", 10, 1), "redraw the progress line every N steps; "),
      integer("demo_digits", 1, 1, 9),
      text("trace", ""),
      number("momentum", 0.0, 0),
      text_or_list("nvme", ""),
      bytes("nvme_budget", "0"),
      positive("zo_eps", 1e-3),
      integer("zo_samples", 1, 1, optim::kMaxZoSamples),
      text("zo_blocks", "host"),
      or_words(integer("zo_gpu_blocks", "0", 0), {"auto"}),
      integer("zo_host_blocks", 0, 0),
      text("zo_storage", ""),
      text("zo_transfer", "storage"),
      integer("zo_window", 3, 2),
      integer("zo_write_back", 4, 1, optim::kMaxZoUpdates),
      or_words(integer("fuyou_host_blocks", "auto", 0), {"auto"}),
      integer("fuyou_window", 3, 2),
      text("staged", ""),
      text_or_list("activations", "auto"),
      text("micro_batch_order", "auto"),
      helped(text("base_storage", "compute"), "the LoRA base's storage, compute or fp8 (e4m3, a scale per channel); "),
      text("export", "auto"),
      boolean("delayed_update", false),
      integer("delayed_update_warmup", 0, 0),
      integer("layers", 0, 0),
      helped(text("tokenizer", "auto"), "the model's tokenizer (a directory, tokenizer.json or tokenizer.model); "
                                        "auto: the model directory's, or the byte tokenizer for a preset; "),
      helped(text("data_format", "auto"),
             "auto (each record by its keys), text, prompt-completion, alpaca, messages or sharegpt; "),
      helped(text("template", ""), "the chat template: chatml, qwen2, llama3, llama2, mistral, mistral-v0.1 or "
                                   "plain; empty: the model's own when it is one of these, else plain; "),
      helped(boolean("answer_only", true),
             "learn only the answers (completions, assistant turns) of instruction and chat data; "),
      or_words(boolean("pack", "auto"), {"auto"}),
      helped(text("eval_data", ""), "held-out data (any format) for the eval loss and perplexity; "),
      helped(integer("eval_every", 0, 0), "evaluate every N steps (0: at the end only); "),
      helped(text("export_precision", "auto"),
             "the export's weights: fp32, bf16, fp16, or auto (the training precision); "),
      helped(or_words(fraction("dropout", "auto"), {"auto"}),
             "a rate for every dropout of the model, or auto (config.json's); "),
      helped(integer("max_nonfinite_losses", 3, 1),
             "stop the job with an error after this many consecutive non-finite losses, keeping the last "
             "checkpoint; "),
      // The run directory's reliability settings (docs/launcher.md, "Reliability").
      helped(boolean("overwrite", false),
             "a new job (--resume none) into an --out holding an earlier run replaces it (its checkpoints/, "
             "metrics.jsonl, config.json and hf/) instead of being refused; "),
      helped(integer("keep_checkpoints", 0, 0),
             "keep the newest N checkpoints (never the one `latest` names); 0: all; "),
      helped(text("verify", "auto"),
             "check what is read back against its checksums: full, sampled, none, or auto (full for a checkpoint "
             "up to 32 GiB, sampled above and for a staged layout); "),
      // LoRA (docs/lora.md): adapters on the blocks' linears over a frozen base.
      helped(integer("lora_rank", 0, 0),
             "LoRA adapters of this rank on the blocks' linears, the base frozen (0: train every parameter); "),
      helped(positive("lora_alpha", 8.0), "LoRA's alpha: the adapters' output is scaled by alpha / rank; "),
      helped(fraction("lora_dropout", 0.0), "dropout on the adapters' input; "),
      helped(text_or_list("lora_targets", "all-linear"),
             "the linears to adapt, a comma list of PEFT target_modules names (q_proj, ...), ferry's short ones "
             "(q, k, v, o, gate, up, down) or all-linear; "),
      helped(text("adapter", "auto"),
             "where the LoRA adapters are exported for PEFT (auto: OUT/adapter; none: not exported); "),
      // Job-file settings without a flag.
      bytes("gpu_working", none),
      fraction("beta1", none),
      fraction("beta2", none),
      positive("eps", none),
      boolean("nesterov", none),
      [&] {
        Setting setting = boolean("loss_scale", none);
        setting.nullable = true;
        return setting;
      }(),
      boolean("offload_checkpoints", none),
      integer("optimizer_threads", none, 0, 4096),
      integer("nvme_queue_depth", none, 0, 65536),
      bytes("nvme_block", none),
      of_kind(SettingKind::kObject, "placement", none),
  };
}

std::string format_bound(double value, SettingKind kind) {
  if (kind == SettingKind::kInteger) return std::to_string(static_cast<long long>(value));
  std::ostringstream text;
  text << value;
  return text.str();
}

std::string kind_phrase(const Setting& setting) {
  switch (setting.kind) {
    case SettingKind::kInteger:
    case SettingKind::kNumber: {
      const bool integers = setting.kind == SettingKind::kInteger;
      const std::string noun = integers ? "an integer" : "a number";
      const bool bounded_above = integers ? setting.high < kMaxInteger : std::isfinite(setting.high);
      const std::string low = format_bound(setting.low, setting.kind), high = format_bound(setting.high, setting.kind);
      if (!bounded_above) return noun + (setting.low_open ? " > " : " >= ") + low;
      if (integers) return noun + " from " + low + " to " + high;
      return noun + " in " + (setting.low_open ? "(" : "[") + low + ", " + high + (setting.high_open ? ")" : "]");
    }
    case SettingKind::kBoolean: return "true or false";
    case SettingKind::kBytes: return "a size such as 4096, 512MiB or 24GiB (0: no limit), below 2^63 bytes";
    case SettingKind::kText: return setting.list ? "text, or a list of texts" : "text";
    case SettingKind::kObject: return "a mapping (see docs/placement.md)";
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

[[noreturn]] void refuse(const Setting& setting, const std::string& where, const std::string& why = "") {
  throw Error(detail::concat(where, " is invalid", why.empty() ? "" : ": " + why, ": ", setting.key, " must be ",
                             valid_range(setting.key)));
}

bool in_range(const Setting& setting, double value) {
  const bool above_low = setting.low_open ? value > setting.low : value >= setting.low;
  const bool below_high = setting.high_open ? value < setting.high : value <= setting.high;
  return std::isfinite(value) && above_low && below_high;
}

Json read_integer(const Setting& setting, const Json& value, const std::string& where) {
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

Json read_number(const Setting& setting, const Json& value, const std::string& where) {
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

const std::vector<Setting>& job_settings() {
  static const std::vector<Setting> kSettings = make_settings();
  return kSettings;
}

const Setting* find_setting(const std::string& key) {
  for (const Setting& setting : job_settings()) {
    if (setting.key == key) return &setting;
  }
  return nullptr;
}

std::string valid_range(const std::string& key) {
  const Setting* setting = find_setting(key);
  FERRY_ASSERT(setting != nullptr, "valid_range of unknown setting ", key);
  std::string words;
  for (const std::string& word : setting->words) words += word + " or ";
  if (setting->nullable) words += "null or ";
  return words + kind_phrase(*setting);
}

const Json& job_defaults() {
  static const Json kDefaults = [] {
    Json defaults = Json::object();
    for (const Setting& setting : job_settings()) {
      if (!setting.default_value.is_null()) defaults[setting.key] = setting.default_value;
    }
    return defaults;
  }();
  return kDefaults;
}

Json read_setting(const std::string& key, const Json& value, const std::string& where) {
  const Setting* setting = find_setting(key);
  FERRY_ASSERT(setting != nullptr, "read_setting of unknown setting ", key);
  if (value.is_null() && setting->nullable) return value;
  if (value.is_string() && std::find(setting->words.begin(), setting->words.end(), value.get<std::string>()) !=
                               setting->words.end()) {
    return value;
  }
  switch (setting->kind) {
    case SettingKind::kInteger: return read_integer(*setting, value, where);
    case SettingKind::kNumber: return read_number(*setting, value, where);
    case SettingKind::kBoolean:
      if (value.is_boolean()) return value;
      if (value == "true" || value == "false") return value == "true";
      refuse(*setting, where);
    case SettingKind::kBytes:
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
      if (value.is_number_float()) return read_setting(key, value.dump(), where);
      refuse(*setting, where);
    case SettingKind::kText: {
      const bool texts = value.is_array() && std::all_of(value.begin(), value.end(),
                                                           [](const Json& item) { return item.is_string(); });
      if (value.is_string() || (setting->list && texts)) return value;
      // A trace is named by a file, or switched on by true.
      if (key == "trace" && value.is_boolean()) return value;
      refuse(*setting, where);
    }
    case SettingKind::kObject:
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

std::string flag_name(std::string key) {
  std::replace(key.begin(), key.end(), '_', '-');
  return key;
}

models::LoraConfig lora_settings(const Json& job) {
  models::LoraConfig lora;
  lora.rank = job["lora_rank"];
  lora.alpha = job["lora_alpha"];
  lora.dropout = job["lora_dropout"];
  const Json& targets = job["lora_targets"];
  if (targets.is_array()) {
    lora.targets = targets.get<std::vector<std::string>>();
  } else {
    lora.targets.clear();
    std::stringstream text(targets.get<std::string>());
    for (std::string name; std::getline(text, name, ',');) {
      if (!name.empty()) lora.targets.push_back(name);
    }
  }
  return lora;
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

}  // namespace ferry::cli
