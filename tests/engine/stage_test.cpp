// `ferry stage` (stage_model) and an engine starting from its layout: against loading the same
// Hugging Face checkpoint, interrupted and resumed, corrupted and repaired, and every bad input.

#include <cerrno>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <sstream>

#include <torch/torch.h>

#include "ferry/engine.h"
#include "ferry/fs.h"
#include "ferry/testing/io_fault.h"
#include "ferry/lock.h"
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

TEST_CASE("a copied layout is refused until staging makes it a layout of its own", "[stage]") {
  TempDir dir;
  const std::string hf = write_checkpoint(dir);
  const std::string original = dir.subdir("original");
  const EngineConfig config = fuyou_config(original);
  stage_model(stage_options(hf, config));
  const std::string manifest = original + "/" + kStageManifestName;
  const std::string original_manifest = file_bytes(manifest);
  const NvmeLayout staged = read_nvme_layout(manifest);
  CHECK(staged.layout_id.size() == 32);
  CHECK(file_bytes(manifest).find("\"directories\": [\n  \".\"\n ]") != std::string::npos);  // relative

  const std::string copy = dir.file("copy");
  REQUIRE(std::system(("cp -a " + original + " " + copy).c_str()) == 0);
  // The copy's manifest names its own directory, never the original's.
  CHECK(read_nvme_layout(copy + "/" + kStageManifestName).directories == std::vector<std::string>{copy});
  CHECK_THROWS_WITH(staged_engine(config, copy),
                    Contains("staged layout '" + copy + "' is not the layout it was staged as") &&
                        Contains("it is a copy") && Contains("run `ferry stage` with the same arguments on it"));

  // Staging into the copy verifies every bundle and gives it an identity of its own.
  EngineConfig at_copy = config;
  at_copy.nvme_directories = {copy};
  const StageReport adopted = stage_model(stage_options(hf, at_copy));
  CHECK(adopted.bundles_written == 0);
  CHECK(adopted.bundles_verified > 0);
  const NvmeLayout independent = read_nvme_layout(copy + "/" + kStageManifestName);
  CHECK(independent.layout_id != staged.layout_id);
  Engine loaded(models::from_pretrained(hf), fuyou_config(dir.subdir("loaded")));
  const std::vector<double> expected = losses(loaded, 3);
  {
    Engine trained = staged_engine(config, copy);
    CHECK(losses(trained, 3) == expected);
  }
  // Training on the copy left the original as staged: adoptable, and the same run.
  CHECK(file_bytes(manifest) == original_manifest);
  Engine again = staged_engine(config, original);
  CHECK(losses(again, 3) == expected);
}

TEST_CASE("a flipped bit in a staged layout is caught on adoption, naming the bundle and the tensor", "[stage]") {
  TempDir dir;
  const std::string hf = write_checkpoint(dir);
  EngineConfig config = fuyou_config(dir.subdir("staged"));
  stage_model(stage_options(hf, config));
  const std::string staged = dir.subdir("staged");
  const NvmeLayout layout = read_nvme_layout(staged + "/" + kStageManifestName);
  const LayoutBundle* master = layout.find("block.2.params");
  REQUIRE(master != nullptr);
  {
    const std::string file = staged + "/ferry-store.bin";
    const int fd = ::open(file.c_str(), O_RDWR);
    REQUIRE(fd >= 0);
    char byte = 0;
    const off_t offset = static_cast<off_t>(master->nvme_offset + 8);
    REQUIRE(::pread(fd, &byte, 1, offset) == 1);
    byte ^= 0x01;
    REQUIRE(::pwrite(fd, &byte, 1, offset) == 1);
    ::close(fd);
  }
  // A tiny model's bundles are one chunk each: even the default sample reads every bundle.
  for (Verify verify : {Verify::kAuto, Verify::kSampled, Verify::kFull}) {
    INFO(to_string(verify));
    config.verify = verify;
    CHECK_THROWS_WITH(staged_engine(config, staged),
                      Contains("staged layout '" + staged + "' is corrupt: bundle 'block.2.params'") &&
                          Contains("which hold block.2.") && Contains("ferry stage"));
  }
  CHECK_FALSE(read_nvme_layout(staged + "/" + kStageManifestName).live);  // refused before adoption
  config.verify = Verify::kNone;
  Engine unchecked = staged_engine(config, staged);
  CHECK(unchecked.steps_taken() == 0);
}

TEST_CASE("a layout another process holds is refused, naming the holder", "[stage]") {
  TempDir dir;
  const std::string hf = write_checkpoint(dir);
  const EngineConfig config = fuyou_config(dir.subdir("staged"));
  stage_model(stage_options(hf, config));
  const std::string staged = dir.subdir("staged");
  int ready[2], done[2];
  REQUIRE(::pipe(ready) == 0);
  REQUIRE(::pipe(done) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    try {
      DirectoryLock lock = DirectoryLock::acquire(staged, "staged layout");
      (void)!::write(ready[1], "x", 1);
      char byte;
      (void)!::read(done[0], &byte, 1);
    } catch (...) {
    }
    ::_exit(0);
  }
  char byte = 0;
  REQUIRE(::read(ready[0], &byte, 1) == 1);
  CHECK_THROWS_WITH(staged_engine(config, staged),
                    Contains("staged layout '" + staged + "' is in use by another ferry process (pid " +
                             std::to_string(pid)));
  CHECK_THROWS_WITH(stage_model(stage_options(hf, config)), Contains("NVMe directory '" + staged + "' is in use"));
  (void)!::write(done[1], "x", 1);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  Engine engine = staged_engine(config, staged);
  CHECK(engine.steps_taken() == 0);
}
