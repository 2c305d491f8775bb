#pragma once

// The settings of a fine-tuning job: one table of every setting with its group, its help, its
// default, its type and its valid range, shared by every front end: `ferry finetune`'s flags and
// job files, `ferry plan`, and the Python Engine. complete_job() gives every setting a job does
// not set its default: the demo's own for the built-in demo, zo2's for zo2, else the defaults for
// real jobs (docs/launcher.md, "Defaults"). The strict readers turn a flag's text or a job file's
// value into the setting's type; every error names the flag or key, the value and what would be
// valid, and a near miss of a known name gets "did you mean".

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace ferry {

enum class JobSettingKind {
  kInteger,  // a whole number; "1e2" reads as 100, "3.5" and "10x" are refused
  kNumber,   // a finite number
  kBoolean,  // true or false
  kBytes,    // a size: a byte count or text such as "24GiB", below 2^63 bytes
  kText,     // text, or for some settings a list of texts
  kObject,   // a JSON object (placement), read by the engine
};

struct JobSetting {
  std::string key;               // the job file's key; the flag is --key with '-' for '_'
  std::string group;             // the heading --help lists it under: "Model", "Data", ...
  std::string help;              // one line for --help: what it is, in what unit
  nlohmann::json default_value;  // the real-job default; null: the engine's default (job file only)
  bool flag = true;              // a flag of `ferry finetune` and `ferry plan`, besides a job-file key
  JobSettingKind kind = JobSettingKind::kText;
  double low = 0, high = 0;      // the valid numbers, for integers and numbers
  bool low_open = false, high_open = false;
  std::vector<std::string> words;  // words valid besides the kind's values ("auto")
  bool list = false;             // text may also be a list of texts
  bool nullable = false;         // null is valid (the engine's default)
};

// Every setting of a job, in the order --help lists them.
const std::vector<JobSetting>& job_settings();

// The groups of job_settings(), in order.
const std::vector<std::string>& job_setting_groups();

// The setting named `key` (with '_'), or null.
const JobSetting* find_job_setting(const std::string& key);

// What `key` accepts, as a phrase: "an integer >= 1", "auto or a number in [0, 1)", ...
std::string job_setting_range(const std::string& key);

// The real-job defaults of the settings that have one.
const nlohmann::json& job_defaults();

// The built-in demo's own settings (data "demo" on the default model: a tiny model learning
// addition in seconds), and
// zo2's (no gradient to clip; MeZO's plain ZO-SGD without weight decay), each where the job does
// not set them.
const nlohmann::json& demo_job_defaults();
const nlohmann::json& zo2_job_defaults();

// `value` (a flag's text, or a job file's value) read as the setting `key`: an integer, number or
// boolean typed and in range, a size checked, anything else as given. `where` names its origin
// in errors: "--steps 3.5" or "steps in job.yaml". Throws ferry::Error.
nlohmann::json read_job_setting(const std::string& key, const nlohmann::json& value, const std::string& where);

// Throws ferry::Error for the first key of `values` that is no setting: "unknown setting 'stpes'
// in job.yaml (did you mean 'steps'?)", or the list of valid ones when none is near. `origin`
// names where the keys come from ("" for none).
void check_job_setting_names(const nlohmann::json& values, const std::string& origin);

// The settings a job gives (each read by read_job_setting already), completed: the real-job
// defaults, then the demo's for the demo job and zo2's where mode is zo2, then `given`; an
// "auto" lr becomes the optimizer family's (job_default_lr). Throws ferry::Error for an unknown key
// or settings that contradict each other (steps and epochs both given).
nlohmann::json complete_job(const nlohmann::json& given);

// The learning rate a job of this kind starts from when it names none: AdamW and Adam 5e-5
// (transformers' Trainer), 2e-4 with LoRA adapters (QLoRA's), SGD and Adagrad 1e-2, zo2's ZO-SGD
// 1e-6 (MeZO's for full-parameter fine-tuning), 1e-4 with LoRA.
double job_default_lr(const std::string& mode, const std::string& optimizer, bool lora);

// The warm-up of a run of `total_steps`: `warmup` steps when the job gives them, else
// warmup_ratio of the run, rounded up.
std::int64_t job_warmup_steps(const nlohmann::json& job, std::int64_t total_steps);

// Strict readers for flags outside the table (`what` names the flag in errors).
std::int64_t parse_integer(const std::string& text, const std::string& what, std::int64_t low, std::int64_t high);
double parse_number(const std::string& text, const std::string& what);
bool parse_boolean(const std::string& text, const std::string& what);  // "true" or "false"

// " (did you mean 'steps'?)" for the nearest of `names` when `name` is a near miss, else "".
std::string did_you_mean(const std::string& name, const std::vector<std::string>& names);

}  // namespace ferry
