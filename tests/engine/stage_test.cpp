// `ferry stage` (stage_model) and an engine starting from its layout: against loading the same
// Hugging Face checkpoint, interrupted and resumed, corrupted and repaired, and every bad input.

#include <cerrno>
#include <fcntl.h>
#include <unistd.h>

#include <fstream>
#include <sstream>

#include <torch/torch.h>

#include "ferry/engine.h"
#include "ferry/io_fault.h"
#include "ferry/model.h"
#include "ferry/stage.h"
#include "ferry/store.h"
#include "support/temp_dir.h"

// glog, which LibTorch includes, defines a CHECK macro of its own; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

#include "engine/training.h"

using namespace ferry;
using namespace ferry::testing;
using Catch::Matchers::Contains;

namespace {

// A sharded Hugging Face checkpoint of a tiny model (three shards or more), in `dir`/hf.
std::string write_checkpoint(const TempDir& dir, std::int64_t layers = 3, const std::string& name = "hf") {
  models::ModelConfig config = models::preset("tiny-llama");
  config.num_layers = layers;
  const std::string path = dir.file(name);
  models::save_pretrained(models::build(config, 7), path, /*max_shard_bytes=*/200'000);
  return path;
}

std::uint64_t checkpoint_bytes(const std::string& hf) {
  safetensors::Checkpoint checkpoint(hf);
  std::uint64_t bytes = 0;
  for (const std::string& name : checkpoint.names()) bytes += checkpoint.tensor(name).bytes();
  return bytes;
}

EngineConfig fuyou_config(const std::string& nvme) {
  EngineConfig config = base_config(Mode::kFuyou);
  config.nvme_directories = {nvme};
  return config;
}

StageOptions stage_options(const std::string& hf, const EngineConfig& config) {
  StageOptions options;
  options.model_dir = hf;
  options.engine = config;
  return options;
}

Engine staged_engine(EngineConfig config, const std::string& dir) {
  config.staged = dir;
  config.nvme_directories.clear();  // taken from the manifest
  return Engine(models::allocate(staged_model_config(dir)), config);
}

std::vector<double> losses(Engine& engine, int steps) {
  auto loader = demo_loader(5);
  std::vector<double> out;
  while (static_cast<int>(out.size()) < steps) {
    if (auto result = engine.train_step(loader->next())) out.push_back(result->loss);
  }
  return out;
}

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

}  // namespace

TEST_CASE("training from a staged layout equals training from the checkpoint", "[stage]") {
  TempDir dir;
  const std::string hf = write_checkpoint(dir);
  EngineConfig config = fuyou_config(dir.subdir("loaded"));
  SECTION("fp32") {}
  SECTION("bf16 with an fp32 master, a host block and gradient accumulation") {
    config.precision = Precision::kBF16;
    config.fuyou.host_blocks = 1;
    config.grad_accumulation = 2;
  }
  SECTION("sgd with momentum, striped over two directories") {
    config.optimizer.kind = OptimizerKind::kSgd;
    config.optimizer.momentum = 0.9;
    config.optimizer.lr = 0.05;
  }
  std::vector<std::string> staged_dirs = {dir.subdir("staged")};
  if (config.optimizer.kind == OptimizerKind::kSgd) staged_dirs.push_back(dir.subdir("staged-b"));

  EngineConfig staging = config;
  staging.nvme_directories = staged_dirs;
  const StageReport report = stage_model(stage_options(hf, staging));
  CHECK(report.bundles_written > 0);
  CHECK(report.bundles_verified == 0);
  CHECK(report.mismatched.empty());
  // Bounded host memory: the largest bundle, far below the checkpoint.
  INFO("peak host " << report.peak_host_bytes << " bytes, checkpoint " << checkpoint_bytes(hf));
  CHECK(report.peak_host_bytes > 0);
  CHECK(report.peak_host_bytes * 3 < checkpoint_bytes(hf));

  Engine loaded(models::from_pretrained(hf), config);
  Engine staged = staged_engine(config, staged_dirs.front());
  CHECK(staged.config().nvme_directories == staged_dirs);
  const std::vector<double> expected = losses(loaded, 6);
  CHECK(losses(staged, 6) == expected);
  CHECK(expected.back() < expected.front());
}

TEST_CASE("a staged layout becomes the job's live state", "[stage]") {
  TempDir dir;
  const std::string hf = write_checkpoint(dir);
  const EngineConfig config = fuyou_config(dir.subdir("staged"));
  stage_model(stage_options(hf, config));
  {
    Engine engine = staged_engine(config, config.nvme_directories.front());
    losses(engine, 2);
  }
  CHECK(read_nvme_layout(dir.subdir("staged") + "/" + kStageManifestName).live);
  CHECK_THROWS_WITH(staged_engine(config, dir.subdir("staged")),
                    Contains("was adopted by an earlier run") && Contains("run `ferry stage` again"));

  // Staging again rewrites what training changed (parameters; states are zeros by record).
  const StageReport again = stage_model(stage_options(hf, config));
  CHECK_FALSE(again.mismatched.empty());
  CHECK(again.bundles_written == static_cast<std::int64_t>(again.mismatched.size()));
  CHECK_FALSE(read_nvme_layout(dir.subdir("staged") + "/" + kStageManifestName).live);
  Engine restaged = staged_engine(config, dir.subdir("staged"));
  Engine loaded(models::from_pretrained(hf), fuyou_config(dir.subdir("loaded")));
  CHECK(losses(restaged, 3) == losses(loaded, 3));
}

TEST_CASE("an interrupted stage resumes and gives the same bytes", "[stage]") {
  TempDir dir;
  const std::string hf = write_checkpoint(dir);
  const EngineConfig clean = fuyou_config(dir.subdir("clean"));
  stage_model(stage_options(hf, clean));
  std::vector<std::uint64_t> data_offsets;
  for (const LayoutBundle& bundle :
       read_nvme_layout(dir.subdir("clean") + "/" + kStageManifestName).bundles) {
    if (bundle.holds_data) data_offsets.push_back(bundle.nvme_offset);
  }
  REQUIRE(data_offsets.size() >= 4);

  FaultInjectingEnv env;
  EngineConfig config = fuyou_config(dir.subdir("resumed"));
  config.nvme_env = &env;
  // Every write from the third bundle with data on fails: the first two are done, the rest not.
  env.fail(IoOp::kWrite, "ferry-store.bin", data_offsets[2], EIO);
  CHECK_THROWS_AS(stage_model(stage_options(hf, config)), IoException);
  const NvmeLayout interrupted = read_nvme_layout(dir.subdir("resumed") + "/" + kStageManifestName);
  std::int64_t done = 0, with_data = 0;
  for (const LayoutBundle& bundle : interrupted.bundles) {
    if (!bundle.holds_data) continue;
    ++with_data;
    done += bundle.complete;
  }
  CHECK(done == 2);
  CHECK(with_data == static_cast<std::int64_t>(data_offsets.size()));
  CHECK_THROWS_WITH(staged_engine(config, dir.subdir("resumed")),
                    Contains("is incomplete") && Contains("run `ferry stage` again"));

  env.clear();
  const StageReport resumed = stage_model(stage_options(hf, config));
  CHECK(resumed.bundles_verified == done);
  CHECK(resumed.bundles_written == with_data - done);
  CHECK(resumed.mismatched.empty());
  CHECK(file_bytes(dir.subdir("resumed") + "/ferry-store.bin") ==
        file_bytes(dir.subdir("clean") + "/ferry-store.bin"));

  const StageReport rerun = stage_model(stage_options(hf, config));
  CHECK(rerun.bundles_written == 0);
  CHECK(rerun.bundles_verified == with_data);
}

TEST_CASE("a corrupted bundle fails its checksum and is written again", "[stage]") {
  TempDir dir;
  const std::string hf = write_checkpoint(dir);
  const EngineConfig config = fuyou_config(dir.subdir("staged"));
  stage_model(stage_options(hf, config));
  const std::string file = dir.subdir("staged") + "/ferry-store.bin";
  const std::string before = file_bytes(file);
  const LayoutBundle* params =
      read_nvme_layout(dir.subdir("staged") + "/" + kStageManifestName).find("block.1.params");
  REQUIRE(params != nullptr);
  const std::uint64_t offset = params->nvme_offset + 100;
  {
    const int fd = ::open(file.c_str(), O_WRONLY);
    REQUIRE(fd >= 0);
    const char flipped = static_cast<char>(before[offset] ^ 0x40);
    REQUIRE(::pwrite(fd, &flipped, 1, static_cast<off_t>(offset)) == 1);
    ::close(fd);
  }
  const StageReport repaired = stage_model(stage_options(hf, config));
  CHECK(repaired.mismatched == std::vector<std::string>{"block.1.params"});
  CHECK(repaired.bundles_written == 1);
  CHECK(file_bytes(file) == before);
}

TEST_CASE("staging and adopting refuse bad inputs before any long work", "[stage]") {
  TempDir dir;
  const std::string hf = write_checkpoint(dir);
  const EngineConfig config = fuyou_config(dir.subdir("staged"));

  SECTION("a mode that keeps nothing on NVMe") {
    EngineConfig offload = config;
    offload.mode = Mode::kZeroOffload;
    CHECK_THROWS_WITH(stage_model(stage_options(hf, offload)),
                      Contains("zero-offload mode keeps nothing on NVMe") && Contains("--mode fuyou"));
    offload.mode = Mode::kZo2;
    offload.zo.block_tier = Tier::kNvme;
    CHECK_THROWS_WITH(stage_model(stage_options(hf, offload)),
                      Contains("zo2 mode cannot start from a staged layout yet"));
  }
  SECTION("a missing model directory") {
    CHECK_THROWS_WITH(stage_model(stage_options(dir.file("no-model"), config)),
                      Contains("no-model' does not exist"));
  }
  SECTION("no, a missing or a read-only NVMe directory") {
    EngineConfig bad = config;
    bad.nvme_directories.clear();
    CHECK_THROWS_WITH(stage_model(stage_options(hf, bad)), Contains("pass --nvme DIR"));
    bad.nvme_directories = {"/proc/ferry-no-such-dir/nvme"};
    CHECK_THROWS_WITH(stage_model(stage_options(hf, bad)),
                      Contains("'/proc/ferry-no-such-dir/nvme' is missing and cannot be created"));
    bad.nvme_directories = {"/proc"};
    CHECK_THROWS_WITH(stage_model(stage_options(hf, bad)),
                      Contains("NVMe directory '/proc' is not writable"));
  }
  SECTION("an NVMe budget or a host budget too small for the layout") {
    EngineConfig small = config;
    small.nvme_budget_bytes = 64 << 10;
    CHECK_THROWS_WITH(stage_model(stage_options(hf, small)),
                      Contains("on the nvme tier") && Contains("Raise --nvme-budget"));
    StageOptions options = stage_options(hf, config);
    options.host_budget_bytes = 4096;
    CHECK_THROWS_WITH(stage_model(options), Contains("a host budget of 4.00 KiB cannot stage this model"));
  }
  SECTION("a directory holding the layout of another model or configuration") {
    stage_model(stage_options(hf, config));
    EngineConfig bf16 = config;
    bf16.precision = Precision::kBF16;
    CHECK_THROWS_WITH(stage_model(stage_options(hf, bf16)),
                      Contains("holds a layout staged for another model or configuration") &&
                          Contains("precision fp32 vs bf16"));
    const std::string other = write_checkpoint(dir, 2, "hf-other");
    CHECK_THROWS_WITH(stage_model(stage_options(other, config)), Contains("model ") &&
                          Contains("stage into another directory"));
  }
  SECTION("an engine given a layout of another model, mode or precision") {
    stage_model(stage_options(hf, config));
    const std::string staged = dir.subdir("staged");
    EngineConfig bf16 = config;
    bf16.precision = Precision::kBF16;
    CHECK_THROWS_WITH(staged_engine(bf16, staged),
                      Contains("was made for another model or configuration") &&
                          Contains("precision fp32 vs bf16"));
    EngineConfig adam_to_sgd = config;
    adam_to_sgd.optimizer.kind = OptimizerKind::kSgd;
    CHECK_THROWS_WITH(staged_engine(adam_to_sgd, staged), Contains("optimizer_states 2 vs 0"));
    models::ModelConfig smaller = staged_model_config(staged);
    smaller.num_layers = 2;
    EngineConfig adopt = config;
    adopt.staged = staged;
    CHECK_THROWS_WITH(Engine(models::allocate(smaller), adopt), Contains("parameters "));
    for (Mode mode : {Mode::kZeroOffload, Mode::kGpu, Mode::kZo2}) {
      INFO(to_string(mode));
      adopt.mode = mode;
      CHECK_THROWS_WITH(Engine(models::allocate(staged_model_config(staged)), adopt),
                        Contains("staged layout '" + staged + "' was given, but"));
    }
    adopt.mode = Mode::kFuyou;
    adopt.nvme_directories = {dir.subdir("elsewhere")};
    CHECK_THROWS_WITH(Engine(models::allocate(staged_model_config(staged)), adopt),
                      Contains("is striped over " + staged));
  }
  SECTION("the JSON key the front ends share") {
    CHECK(engine_config_from_json(R"({"mode": "fuyou", "staged": "/mnt/a/job"})").staged == "/mnt/a/job");
  }
  SECTION("an engine given a directory without a layout") {
    CHECK_THROWS_WITH(staged_engine(config, dir.subdir("empty")),
                      Contains("no staged layout at") && Contains("ferry stage --model HF_DIR"));
  }
}
