#pragma once

// A job as `ferry finetune` and `ferry plan` both read it: the same flags (every setting of
// ferry/job.h, grouped in --help), the same job file, the same defaults, the same engine config,
// and the same plan. So `ferry plan` with a job's flags says what `ferry finetune` with them will
// find before it trains.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "ferry/engine.h"
#include "ferry/model.h"
#include "ferry/plan.h"

namespace ferry::cli {

// "gpu_budget" -> "gpu-budget".
std::string flag_name(std::string key);

// The real-job default of setting `key` as its flag takes it: "400", "auto", "all-linear".
std::string flag_default(const std::string& key);

// Adds every job setting's flag under its group's heading, with its help, default and valid
// range, and --config, --hardware, --pack and --no-pack.
void add_job_options(cxxopts::Options& options);

// The help of a command built with add_job_options: its description, then the job's groups in
// order, then `more_groups` (the command's own).
std::string job_help(const cxxopts::Options& options, const std::vector<std::string>& more_groups);

// The job the flags and the job file describe, completed with its defaults (complete_job): flags
// override the file. Refuses unknown flags and keys, naming the nearest known one.
nlohmann::json resolve_job(const cxxopts::ParseResult& args, const std::string& command);

bool is_directory_name(const std::string& model);

// The model's shape without its weights, with the job's adapters: a preset (cut to `layers`), or a
// Hugging Face directory's config.json.
models::ModelConfig model_shape(const nlohmann::json& job);
models::LoraConfig job_lora(const nlohmann::json& job);

// The job's engine settings, read by the parser the other front ends share. "auto" activations,
// host blocks and micro-batch order are left for the plan; an "auto" run length and warm-up for
// the caller, which knows the data (set_schedule).
EngineConfig engine_config(const nlohmann::json& job, std::int64_t blocks);

// The schedule of a run of `total_steps`, its warm-up by job_warmup_steps.
void set_schedule(const nlohmann::json& job, std::int64_t total_steps, EngineConfig* config);

// The figures the plan runs on: `hardware` names a calibration file (`ferry bench calibrate
// --out FILE`) or a preset; empty, ferry-calibration.json when the working directory has one,
// else a quick calibration of this machine and `directories` (a few seconds, said on stderr).
Hardware job_hardware(const std::string& hardware, const std::vector<std::string>& directories);

// The NVMe budget the plan holds the job to: the directories' free space unless the job's budget
// says less (0: the free space). Throws when a directory does not exist.
std::uint64_t nvme_budget(const EngineConfig& config);

// The plan's request for the job: the placement's choices fuyou leaves to "auto", its micro-batch,
// one rank's share of `world_size` ranks.
PlanRequest plan_request(const nlohmann::json& job, const EngineConfig& config, const models::ModelConfig& shape,
                         std::optional<MeasuredCompute> measured, Hardware hardware, int world_size = 1);

}  // namespace ferry::cli
