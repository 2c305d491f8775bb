// `ferry stage`: streams a Hugging Face checkpoint into the NVMe layout a fuyou job allocates, so
// `ferry finetune --staged DIR` starts without reading the checkpoint (docs/stage.md).

#include <cxxopts.hpp>
#include <fstream>
#include <iostream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "cli/job_options.h"
#include "ferry/job.h"
#include "ferry/memory.h"
#include "ferry/stage.h"

namespace ferry::cli {
namespace {

using Json = nlohmann::json;

// The engine settings of a job config (the keys engine_config_from_json knows), for staging
// exactly what the job will adopt.
Json job_file_settings(const std::string& path) {
  std::ifstream in(path);
  FERRY_CHECK(in.good(), "cannot read the job config '", path, "'");
  std::stringstream text;
  text << in.rdbuf();
  const Json job = Json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  FERRY_CHECK(job.is_object(), "the job config '", path, "' is not a JSON object");
  Json settings = Json::object();
  for (const std::string& key : engine_config_keys()) {
    if (job.contains(key)) settings[key] = job[key];
  }
  if (job.contains("model")) settings["model"] = job["model"];
  return settings;
}

int run_stage(int argc, char** argv) {
  cxxopts::Options options(argv[0],
                           "Stage a Hugging Face checkpoint into a fuyou job's NVMe layout");
  options.add_options()
      ("model", "Hugging Face model directory (config.json and safetensors)", cxxopts::value<std::string>())
      ("nvme", "the job's NVMe directories (comma-separated); the first holds the manifest",
       cxxopts::value<std::string>())
      ("config", "a job config (JSON, as ferry finetune takes): its engine settings", cxxopts::value<std::string>())
      ("mode", "the job's mode (fuyou)", cxxopts::value<std::string>())
      ("precision", "the job's precision: fp32, bf16 or fp16", cxxopts::value<std::string>())
      ("optimizer", "the job's optimizer: adamw, adam, sgd or adagrad", cxxopts::value<std::string>())
      ("momentum", "sgd momentum (a momentum buffer is one more state)", cxxopts::value<std::string>())
      ("grad-accum", "the job's micro-batches per step", cxxopts::value<std::string>())
      ("fuyou-host-blocks", "blocks whose parameters the job keeps in host memory", cxxopts::value<std::string>())
      ("host-budget", "host memory staging may hold (0: the largest bundle)",
       cxxopts::value<std::string>()->default_value("0"))
      ("h,help", "show this help");
  auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    return 0;
  }
  Json settings = args.count("config") ? job_file_settings(args["config"].as<std::string>()) : Json::object();
  if (!settings.contains("mode")) settings["mode"] = "fuyou";
  for (const char* flag : {"mode", "precision", "optimizer", "nvme"}) {
    if (args.count(flag)) settings[flag] = args[flag].as<std::string>();
  }
  for (const char* key : {"momentum", "grad_accum", "fuyou_host_blocks"}) {
    const std::string flag = flag_name(key);
    if (!args.count(flag)) continue;
    const std::string text = args[flag].as<std::string>();
    settings[key] = read_job_setting(key, text, "--" + flag + " " + text);
  }
  FERRY_CHECK(!settings.contains("fuyou_host_blocks") || settings["fuyou_host_blocks"].is_number(),
              "fuyou_host_blocks = ", settings["fuyou_host_blocks"].dump(), " cannot be staged: "
              "the layout depends on it; pass --fuyou-host-blocks N (the number `ferry plan` chose)");
  StageOptions stage;
  FERRY_CHECK(args.count("model") || settings.contains("model"),
              "ferry stage needs --model HF_DIR (or \"model\" in --config)");
  stage.model_dir = args.count("model") ? args["model"].as<std::string>()
                                        : settings["model"].get<std::string>();
  settings.erase("model");
  stage.engine = engine_config_from_json(settings.dump());
  stage.host_budget_bytes = parse_bytes(args["host-budget"].as<std::string>());
  stage.progress = [](const std::string& bundle, std::uint64_t done, std::uint64_t total) {
    std::cerr << "\r" << format_bytes(done) << " of " << format_bytes(total) << "  " << bundle
              << "\033[K" << std::flush;
  };

  const StageReport report = stage_model(stage);
  std::cerr << "\n";
  std::cout << "staged " << stage.model_dir << " into " << report.manifest_path << ": "
            << report.bundles << " bundles, " << report.bundles_written << " written ("
            << format_bytes(report.bytes_written) << "), " << report.bundles_verified
            << " verified (" << format_bytes(report.bytes_verified) << "), "
            << format_bytes(report.nvme_bytes) << " on NVMe, peak host "
            << format_bytes(report.peak_host_bytes) << ", " << report.seconds << " s\n";
  for (const std::string& name : report.mismatched) {
    std::cout << "  checksum mismatch, written again: " << name << "\n";
  }
  std::cout << "start the job with --staged " << stage.engine.nvme_directories.front() << "\n";
  return 0;
}

}  // namespace

FERRY_CLI_COMMAND("stage", "stream a checkpoint into a fuyou job's NVMe layout", run_stage);

}  // namespace ferry::cli
