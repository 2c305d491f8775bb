#pragma once

// Staging (`ferry stage`, docs/stage.md): streams a Hugging Face checkpoint, sharded or not and
// larger than host memory, into the NVMe layout the engine allocates for a job's mode and
// config (parameters in the compute dtype, fp32 master, zeroed optimizer states), within a host
// budget smaller than the checkpoint. Each bundle is written, fdatasynced and only then recorded
// with its checksum in the layout's manifest, so a rerun skips (and verifies) what is done and
// continues where an interrupted stage stopped. An engine given EngineConfig::staged then adopts
// the files in place of reading the checkpoint.
//
//   ferry::StageOptions options;
//   options.model_dir = "/data/llama-13b";
//   options.engine.mode = ferry::Mode::kFuyou;
//   options.engine.precision = ferry::Precision::kBF16;
//   options.engine.nvme_directories = {"/mnt/nvme0/job", "/mnt/nvme1/job"};
//   ferry::StageReport report = ferry::stage_model(options);
//   ...
//   config.staged = "/mnt/nvme0/job";  // the first NVMe directory holds the manifest
//   ferry::Engine engine(ferry::models::allocate(ferry::staged_model_config(config.staged)), config);

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "ferry/engine.h"
#include "ferry/model_config.h"

namespace ferry {

// The manifest's file name, in the first NVMe directory of a staged layout.
inline constexpr const char* kStageManifestName = "ferry-stage.json";

struct StageOptions {
  // A Hugging Face model directory: config.json and model.safetensors, or shards with
  // model.safetensors.index.json.
  std::string model_dir;
  // The job's settings, as the engine that adopts the layout will get them: mode (fuyou),
  // precision, optimizer, grad_accumulation, fuyou.host_blocks, nvme_directories,
  // nvme_budget_bytes and nvme_env are what shape the layout.
  EngineConfig engine;
  // Host memory staging may hold in bundles at once; 0: the largest bundle, the least that
  // works. Reading a tensor whose checkpoint dtype is not the bundle's adds one tensor's
  // conversion buffer on top.
  std::uint64_t host_budget_bytes = 0;
  // Called after each bundle is durable or verified, with the bytes of bundles done so far and
  // in all: for a progress bar.
  std::function<void(const std::string& bundle, std::uint64_t done_bytes,
                     std::uint64_t total_bytes)>
      progress;
};

struct StageReport {
  std::string manifest_path;
  std::int64_t bundles = 0;           // bundles the layout has on NVMe
  std::int64_t bundles_written = 0;   // written by this run
  std::int64_t bundles_verified = 0;  // done by an earlier run; their checksums matched
  // Done by an earlier run but their checksums did not match (a torn write, a changed file, a
  // layout a training run has updated): written again.
  std::vector<std::string> mismatched;
  std::uint64_t bytes_written = 0;
  std::uint64_t bytes_verified = 0;
  std::uint64_t nvme_bytes = 0;       // the layout's extent on NVMe
  std::uint64_t peak_host_bytes = 0;  // bundles held in host memory at once, at most
  double seconds = 0;
};

// Stages options.model_dir for options.engine's mode and config. Fails before writing anything
// for a mode that keeps nothing on NVMe (gpu, zero-offload, zo2 for now), missing, read-only or
// too small NVMe directories, a host budget below the largest bundle, or a directory that
// already holds a layout of another model, checkpoint, mode or config (naming what differs and
// the fix). Throws IoException when a transfer fails; a rerun continues from there.
StageReport stage_model(const StageOptions& options);

// The model config recorded in the staged layout at `dir` (the directory holding the manifest),
// so a job can build its model without the checkpoint: models::allocate(staged_model_config(dir)).
models::ModelConfig staged_model_config(const std::string& dir);

}  // namespace ferry
