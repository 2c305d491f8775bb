#include "cli/job_options.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <sstream>

#include "cli/job_file.h"
#include "ferry/check.h"
#include "ferry/fs.h"
#include "ferry/job.h"
#include "ferry/system.h"

namespace ferry::cli {
namespace {

using Json = nlohmann::json;

constexpr const char* kDefaultCalibration = "ferry-calibration.json";

// " (default: 400; valid: an integer >= 1)": a text's valid values are in its help.
std::string default_and_range(const JobSetting& setting) {
  std::string text = flag_default(setting.key);
  if (text.empty()) text = "empty";
  if (setting.kind == JobSettingKind::kText) return " (default: " + text + ")";
  return " (default: " + text + "; valid: " + job_setting_range(setting.key) + ")";
}

// Note: cxxopts is told to let unknown flags through, so that the error can name the nearest
// known one; a stray word is refused too, since every setting is a flag with a value.
void refuse_unknown_flags(const cxxopts::ParseResult& args, const std::string& command,
                          const std::vector<std::string>& flags) {
  if (args.unmatched().empty()) return;
  const std::string& first = args.unmatched().front();
  if (first.rfind("-", 0) != 0) {
    throw Error(detail::concat("unexpected argument '", first, "': every setting is a flag with a value ",
                               "(--steps 100); `ferry ", command, " --help` lists them"));
  }
  std::string name = first.substr(first.find_first_not_of('-'));
  name = name.substr(0, name.find('='));
  const std::string hint = did_you_mean(name, flags);
  throw Error(detail::concat("unknown flag '", first, "'", hint, hint.empty() ? ": `ferry " + command + " --help` "
                             "lists the flags" : ""));
}

// A preset, cut to `layers` blocks when not 0, or a Hugging Face directory (which keeps its own).
models::ModelConfig base_shape(const std::string& name, std::int64_t layers) {
  if (!is_directory_name(name)) return models::truncated(models::preset(name), layers);
  FERRY_CHECK(layers == 0, "layers = ", layers, " truncates a preset; model '", name, "' is a Hugging Face "
              "directory, which keeps its own blocks");
  FERRY_CHECK(fs::is_directory(name), "model directory '", name, "' does not exist: give a Hugging Face model ",
              "directory (config.json and safetensors) or a preset name such as llama-7b");
  FERRY_CHECK(fs::exists(name + "/config.json"), "model directory '", name, "' has no config.json: give the ",
              "directory transformers' save_pretrained wrote, or a preset name");
  return models::ModelConfig::from_hf_file(name + "/config.json");
}

// Where even a quick calibration cannot run (a directory without O_DIRECT, say): the machine's
// figures without those directories, and NVMe at a stated default rate.
Hardware quick_calibration(const std::vector<std::string>& directories) {
  CalibrationOptions options;
  options.nvme_directories = directories;
  options.nvme_bytes = std::uint64_t{32} << 20;
  options.repeat = 1;
  options.quick = true;
  std::fprintf(stderr, "plan: no --hardware and no %s here: planning with a quick calibration of this machine "
               "(rougher figures; `ferry bench calibrate --out %s` measures them properly)\n", kDefaultCalibration,
               kDefaultCalibration);
  try {
    return calibrate(options);
  } catch (const Error& error) {
    constexpr double kDefaultNvmeGbps = 1.0;
    std::fprintf(stderr, "plan: the NVMe directories could not be measured (%s): planning them at %.1f GB/s each "
                 "way\n", error.what(), kDefaultNvmeGbps);
    options.nvme_directories.clear();
    Hardware hardware = calibrate(options);
    for (const std::string& directory : directories) {
      hardware.nvme.push_back({directory, kDefaultNvmeGbps, kDefaultNvmeGbps});
    }
    return hardware;
  }
}

}  // namespace

std::string flag_name(std::string key) {
  std::replace(key.begin(), key.end(), '_', '-');
  return key;
}

std::string flag_default(const std::string& key) {
  const Json& value = job_defaults().at(key);
  return value.is_string() ? value.get<std::string>() : value.dump();
}

void add_job_options(cxxopts::Options& options) {
  options.set_width(110);
  options.add_options("Job")("config", "a job file, YAML (*.yaml, *.yml) or JSON, with any setting below and every "
                             "engine setting (beta1, loss_scale, ...); flags override it", cxxopts::value<std::string>())(
      "hardware", "the plan's figures: a calibration file (`ferry bench calibrate --out FILE`) or a hardware preset "
      "(h100, ...); default: ferry-calibration.json if present, else a quick calibration",
      cxxopts::value<std::string>());
  for (const std::string& group : job_setting_groups()) {
    for (const JobSetting& setting : job_settings()) {
      if (setting.group != group || !setting.flag || setting.key == "pack") continue;
      // --overwrite alone means true (--overwrite=false to say no).
      auto parsed = setting.key == "overwrite" ? cxxopts::value<std::string>()->implicit_value("true")
                                               : cxxopts::value<std::string>();
      options.add_options(group)(flag_name(setting.key), setting.help + default_and_range(setting), parsed);
    }
  }
  options.add_options("Data")("pack", "pack examples into full rows, documents never seeing each other (the default for "
                              "text and token files)")("no-pack", "one example per row, padded (the default for "
                              "instruction and chat data)");
}

std::string job_help(const cxxopts::Options& options, const std::vector<std::string>& more_groups) {
  std::vector<std::string> groups = {"Job"};
  groups.insert(groups.end(), job_setting_groups().begin(), job_setting_groups().end());
  groups.insert(groups.end(), more_groups.begin(), more_groups.end());
  return options.help(groups);
}

Json resolve_job(const cxxopts::ParseResult& args, const std::string& command) {
  std::vector<std::string> flags = {"config", "hardware", "pack", "no-pack", "help"};
  for (const JobSetting& setting : job_settings()) {
    if (setting.flag) flags.push_back(flag_name(setting.key));
  }
  refuse_unknown_flags(args, command, flags);
  Json given = Json::object();
  if (args.count("config")) {
    const std::string path = args["config"].as<std::string>();
    const Json file = read_job_file(path);
    check_job_setting_names(file, path);
    for (auto& [key, value] : file.items()) {
      given[key] = read_job_setting(key, value, detail::concat(key, " = ", value.dump(), " in ", path));
    }
  }
  FERRY_CHECK(!(args.count("pack") && args.count("no-pack")), "--pack and --no-pack contradict each other: give one");
  if (args.count("pack") || args.count("no-pack")) given["pack"] = args.count("pack") > 0;
  for (const JobSetting& setting : job_settings()) {
    const std::string flag = flag_name(setting.key);
    if (!setting.flag || setting.key == "pack" || !args.count(flag)) continue;
    const std::string text = args[flag].as<std::string>();
    given[setting.key] = read_job_setting(setting.key, text, "--" + flag + " " + text);
  }
  return complete_job(given);
}

bool is_directory_name(const std::string& model) { return model.find('/') != std::string::npos; }

models::LoraConfig job_lora(const Json& job) {
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

models::ModelConfig model_shape(const Json& job) {
  models::ModelConfig shape = base_shape(job["model"], job["layers"]);
  shape.lora = job_lora(job);
  shape.validate();
  return shape;
}

EngineConfig engine_config(const Json& job, std::int64_t blocks) {
  Json settings;
  for (const std::string& key : engine_config_keys()) {
    if (job.contains(key)) settings[key] = job[key];
  }
  for (const char* key : {"steps", "warmup"}) {
    if (settings[key] == "auto") settings.erase(key);
  }
  if (settings["fuyou_host_blocks"] == "auto") settings.erase("fuyou_host_blocks");
  const std::string order = settings["micro_batch_order"];
  FERRY_CHECK(order == "auto" || order == "batch-major" || order == "layer-major", "micro_batch_order = '", order,
              "' is invalid: use auto, batch-major or layer-major");
  if (order == "auto") settings.erase("micro_batch_order");
  const Json activations = settings["activations"];
  settings.erase("activations");
  EngineConfig config = engine_config_from_json(settings.dump());
  if (activations.is_array()) {
    config.placement.activations = engine_config_from_json(Json{{"activations", activations}}.dump()).placement.activations;
  } else if (activations != "auto") {
    config.placement.activations = parse_activations(activations.get<std::string>(), blocks);
  }
  return config;
}

void set_schedule(const Json& job, std::int64_t total_steps, EngineConfig* config) {
  config->schedule.total_steps = total_steps;
  config->schedule.warmup_steps = job_warmup_steps(job, total_steps);
}

Hardware job_hardware(const std::string& hardware, const std::vector<std::string>& directories) {
  if (!hardware.empty()) return fs::exists(hardware) ? Hardware::load(hardware) : hardware_preset(hardware);
  if (fs::exists(kDefaultCalibration)) return Hardware::load(kDefaultCalibration);
  return quick_calibration(directories);
}

// Note: the job's files are striped evenly over its directories, so the one with the least free
// space bounds them all.
std::uint64_t nvme_budget(const EngineConfig& config) {
  if (config.nvme_directories.empty()) return config.nvme_budget_bytes;
  std::uint64_t least_free = std::numeric_limits<std::uint64_t>::max();
  for (const std::string& directory : config.nvme_directories) {
    const DiskTierInfo disk = probe_disk_tier(directory);
    FERRY_CHECK(disk.exists, "NVMe directory '", directory, "' does not exist: create it on the SSD (mkdir -p ",
                directory, ") or fix the path given to --nvme");
    if (disk.total_bytes == 0) return config.nvme_budget_bytes;  // ramfs keeps no count of its blocks
    least_free = std::min(least_free, disk.free_bytes);
  }
  const std::uint64_t free_bytes = least_free * config.nvme_directories.size();
  return config.nvme_budget_bytes == 0 ? free_bytes : std::min(config.nvme_budget_bytes, free_bytes);
}

PlanRequest plan_request(const Json& job, const EngineConfig& config, const models::ModelConfig& shape,
                         std::optional<MeasuredCompute> measured, Hardware hardware, int world_size) {
  PlanRequest request;
  request.model_name = job["model"];
  request.model = shape;
  request.engine = config;
  request.engine.nvme_budget_bytes = nvme_budget(config);
  // Note: nothing the plan sizes or times depends on the schedule; a run whose length comes from
  // its data (steps auto) is not known yet when it is planned, and is planned as one step.
  if (request.engine.schedule.total_steps == 0) request.engine.schedule.total_steps = 1;
  request.batch = job["batch"];
  request.seq = job["seq"];
  const bool fuyou = config.mode == Mode::kFuyou;
  request.choose_activations = fuyou && job["activations"] == "auto";
  request.choose_host_blocks = fuyou && job["fuyou_host_blocks"] == "auto" && config.staged.empty();
  request.choose_micro_batch_order = fuyou && job["micro_batch_order"] == "auto";
  request.measured = std::move(measured);
  request.hardware = std::move(hardware);
  request.world_size = world_size;
  return request;
}

}  // namespace ferry::cli
