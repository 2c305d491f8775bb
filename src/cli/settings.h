#pragma once

// The settings of a `ferry finetune` job: one table of every flag and job-file key with its
// default, its type and its valid range, and the strict readers that turn a flag's text or a job
// file's value into the setting's type. Every error names the flag or key, the value and what
// would be valid; a near miss of a known name gets "did you mean".

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ferry/model_config.h"

namespace ferry::cli {

enum class SettingKind {
  kInteger,  // a whole number; "1e2" reads as 100, "3.5" and "10x" are refused
  kNumber,   // a finite number
  kBoolean,  // true or false
  kBytes,    // a size: a byte count or text such as "24GiB", below 2^63 bytes
  kText,     // text, or for some settings a list of texts
  kObject,   // a JSON object (placement), read by the engine
};

struct Setting {
  std::string key;             // the job file's key; the flag is --key with '-' for '_'
  nlohmann::json default_value;  // null: a job-file setting without a flag (the engine's default)
  SettingKind kind = SettingKind::kText;
  double low = 0, high = 0;    // the valid numbers, for integers and numbers
  bool low_open = false, high_open = false;
  std::vector<std::string> words;  // words valid besides the kind's values ("auto")
  bool list = false;           // text may also be a list of texts
  bool nullable = false;       // null is valid (the engine's default)
  std::string help;            // for --help, before the default
};

// Every setting of a job: each flag of `ferry finetune` and each key of its job file.
const std::vector<Setting>& job_settings();

// The setting named `key` (with '_'), or null.
const Setting* find_setting(const std::string& key);

// What `key` accepts, as a phrase: "an integer >= 1", "auto or a number in [0, 1)", ...
std::string valid_range(const std::string& key);

// The settings with a flag, and their defaults.
const nlohmann::json& job_defaults();

// `value` (a flag's text, or a job file's value) read as the setting `key`: an integer, number or
// boolean typed and in range, a size checked, anything else as given. `where` names its origin
// in errors: "--steps 3.5" or "steps in job.yaml". Throws ferry::Error.
nlohmann::json read_setting(const std::string& key, const nlohmann::json& value, const std::string& where);

// The flag of setting `key`: "lora_rank" -> "lora-rank".
std::string flag_name(std::string key);

// The LoRA settings of a resolved job (lora_rank, lora_alpha, lora_dropout, lora_targets: a list,
// or one text with commas); rank 0 trains every parameter.
models::LoraConfig lora_settings(const nlohmann::json& job);

// Strict readers for flags outside the table (`what` names the flag in errors).
std::int64_t parse_integer(const std::string& text, const std::string& what, std::int64_t low, std::int64_t high);
double parse_number(const std::string& text, const std::string& what);
bool parse_boolean(const std::string& text, const std::string& what);  // "true" or "false"

// " (did you mean 'steps'?)" for the nearest of `names` when `name` is a near miss, else "".
std::string did_you_mean(const std::string& name, const std::vector<std::string>& names);

}  // namespace ferry::cli
