// What a run directory and its checkpoints promise (docs/launcher.md, "Reliability"): a fault
// at any file of a save or an export leaves the previous one whole and `latest` naming it; a
// flipped bit is caught with the tensor named; `latest` is relative, so a moved run resumes; a
// second job is refused; and a process killed at a random point of a save resumes with
// --resume auto to exactly the bits of a run that was never killed, in every mode.

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "ferry/engine.h"
#include "ferry/fs.h"
#include "ferry/testing/io_fault.h"
#include "ferry/lock.h"
#include "ferry/model.h"
#include "ferry/run.h"
#include "ferry/safetensors.h"
#include "support/temp_dir.h"

// glog, which LibTorch includes, defines a CHECK macro of its own; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

#include "engine/training.h"

using namespace ferry;
using namespace ferry::testing;
using Catch::Matchers::Contains;
using Json = nlohmann::json;

namespace {

LayeredModel tiny() { return models::build(models::preset("tiny-llama"), 7); }

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

void flip_bit(const std::string& path, std::uint64_t offset) {
  std::fstream file(path, std::ios::binary | std::ios::in | std::ios::out);
  REQUIRE(file.good());
  file.seekg(static_cast<std::streamoff>(offset));
  char byte = 0;
  file.read(&byte, 1);
  byte ^= 0x10;
  file.seekp(static_cast<std::streamoff>(offset));
  file.write(&byte, 1);
}

// Where tensor `name`'s data starts in a safetensors file.
std::uint64_t tensor_offset(const std::string& path, const std::string& name) {
  safetensors::Reader reader(path);
  return reader.header().buffer_offset + reader.tensor(name).data_begin;
}

RunOptions run_options(const std::string& out, const std::string& resume = "none", Env* env = nullptr) {
  RunOptions options;
  options.out = out;
  options.resume = resume;
  options.env = env;
  return options;
}

// Steps the engine to `step`, logging each step and saving after each when `save_each`.
void train_to(Engine& engine, data::DataLoader& loader, RunDirectory& run, std::int64_t step, bool save_each) {
  while (engine.steps_taken() < step) {
    const std::optional<StepResult> result = engine.train_step(loader.next());
    if (!result) continue;
    run.log(Json{{"step", result->step}, {"loss", result->loss}}.dump());
    if (save_each) run.save(engine, loader.state().to_json());
  }
}

std::vector<std::string> names_in(const std::string& dir) { return fs::list_directory(dir); }

// --- the kill -9 child ---------------------------------------------------------------------------

EngineConfig crash_config(const std::string& mode, const std::string& nvme) {
  EngineConfig config = base_config(parse_mode(mode));
  if (config.mode == Mode::kFuyou) config.nvme_directories = {nvme};
  return config;
}

constexpr std::int64_t kCrashSteps = 4;

// The job the child runs and the parent resumes: resume auto, a checkpoint after every step.
// `env` sees every file of the run directory and the checkpoints.
void crash_job(const std::string& mode, const std::string& out, const std::string& nvme, Env* env) {
  EngineConfig config = crash_config(mode, nvme);
  config.checkpoint_env = env;
  RunDirectory run(run_options(out, "auto", env));
  Engine engine(tiny(), config);
  auto loader = demo_loader(3);
  if (!run.resume_from().empty()) loader->restore(data::LoaderState::from_json(engine.load(run.resume_from())));
  run.begin(engine.steps_taken());
  train_to(engine, *loader, run, kCrashSteps, /*save_each=*/true);
}

// Counts the calls a save makes (anything under checkpoints/), and kills the process at number
// `kill_at` when it is not 0.
void count_save_calls(FaultInjectingEnv& env, std::int64_t* calls, std::int64_t kill_at) {
  env.on_each_call([calls, kill_at](const std::string&, const std::string& path) {
    if (path.find("/checkpoints/") == std::string::npos) return;
    if (++*calls == kill_at) ::raise(SIGKILL);
  });
}

std::string self_executable() {
  char path[PATH_MAX];
  const ssize_t length = ::readlink("/proc/self/exe", path, sizeof path - 1);
  REQUIRE(length > 0);
  return std::string(path, static_cast<std::size_t>(length));
}

}  // namespace

// Run by the kill -9 test below in a process of its own; does nothing when run by hand.
TEST_CASE("crash child: trains and saves until it is killed", "[.crash-child]") {
  const char* mode = std::getenv("FERRY_CRASH_MODE");
  if (mode == nullptr) return;
  FaultInjectingEnv env;
  std::int64_t calls = 0;
  count_save_calls(env, &calls, std::atoll(std::getenv("FERRY_CRASH_AT")));
  crash_job(mode, std::getenv("FERRY_CRASH_OUT"), std::getenv("FERRY_CRASH_NVME"), &env);
}

TEST_CASE("kill -9 at a random point of a save, then resume auto: the bits of an uninterrupted run") {
  const std::string mode = GENERATE(as<std::string>{}, "gpu", "zero-offload", "fuyou", "zo2");
  INFO("mode " << mode);
  TempDir dir;
  const std::string reference = dir.file("reference");
  FaultInjectingEnv counting;
  std::int64_t calls = 0;
  count_save_calls(counting, &calls, 0);
  crash_job(mode, reference, dir.subdir("reference-nvme"), &counting);
  REQUIRE(calls > 0);
  const std::string final_name = "/checkpoints/step-00000" + std::to_string(kCrashSteps);

  std::mt19937_64 random(std::random_device{}());
  for (int attempt = 0; attempt < 2; ++attempt) {
    const std::int64_t kill_at = std::uniform_int_distribution<std::int64_t>(1, calls)(random);
    const std::string out = dir.file("killed-" + std::to_string(attempt));
    const std::string nvme = dir.subdir("killed-nvme-" + std::to_string(attempt));
    INFO("killed at call " << kill_at << " of the " << calls << " the saves make");
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::setenv("FERRY_CRASH_MODE", mode.c_str(), 1);
      ::setenv("FERRY_CRASH_OUT", out.c_str(), 1);
      ::setenv("FERRY_CRASH_NVME", nvme.c_str(), 1);
      ::setenv("FERRY_CRASH_AT", std::to_string(kill_at).c_str(), 1);
      const std::string exe = self_executable();
      const char* name = "crash child: trains and saves until it is killed";
      ::execl(exe.c_str(), exe.c_str(), name, static_cast<char*>(nullptr));
      ::_exit(127);
    }
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    REQUIRE(WIFSIGNALED(status));
    REQUIRE(WTERMSIG(status) == SIGKILL);

    crash_job(mode, out, nvme, nullptr);  // --resume auto, in this process
    CHECK(file_bytes(out + final_name + "/model.safetensors") ==
          file_bytes(reference + final_name + "/model.safetensors"));
    CHECK(file_bytes(out + final_name + "/optimizer.safetensors") ==
          file_bytes(reference + final_name + "/optimizer.safetensors"));
    // metrics.jsonl describes one run: every step once, with the uninterrupted run's losses.
    CHECK(file_bytes(out + "/metrics.jsonl") == file_bytes(reference + "/metrics.jsonl"));
    CHECK(latest_checkpoint(out) == out + final_name);
  }
}

TEST_CASE("a fault at any file of a save leaves the previous checkpoint, and latest naming it") {
  TempDir dir;
  const std::string out = dir.file("run");
  FaultInjectingEnv env;
  EngineConfig config = base_config(Mode::kZeroOffload);
  config.checkpoint_env = &env;
  RunDirectory run(run_options(out, "none", &env));
  Engine engine(tiny(), config);
  auto loader = demo_loader(3);
  run.begin(0);
  train_to(engine, *loader, run, 1, /*save_each=*/true);
  const std::string first = out + "/checkpoints/step-000001";
  REQUIRE(latest_checkpoint(out) == first);
  std::map<std::string, std::string> first_files;
  for (const std::string& name : names_in(first)) first_files[name] = file_bytes(first + "/" + name);
  train_to(engine, *loader, run, 2, /*save_each=*/false);

  struct Fault {
    std::string what;
    std::function<void()> arm;
  };
  std::vector<Fault> faults;
  for (const std::string file : {"model.safetensors", "optimizer.safetensors", "config.json", "trainer_state.json",
                                 "latest"}) {
    const std::string part = "/" + file;
    faults.push_back({"ENOSPC writing " + file, [&env, part] { env.fail(IoOp::kWrite, part, 0, ENOSPC); }});
    faults.push_back({"EIO writing " + file, [&env, part] { env.fail(IoOp::kWrite, part, 0, EIO); }});
    faults.push_back({"fdatasync of " + file, [&env, part] { env.fail_call(EnvCall::kSync, part, EIO); }});
    faults.push_back({"close of " + file, [&env, part] { env.fail_call(EnvCall::kClose, part, EIO); }});
    faults.push_back({"rename of " + file, [&env, part] { env.fail_call(EnvCall::kRename, part, EIO); }});
  }
  // The calls on the directories themselves, whose paths every file in them shares: each is
  // failed when it comes, by the hook.
  auto fail_when = [&env](const std::string& call, const std::string& path, EnvCall kind, int error) {
    env.on_each_call([&env, call, path, kind, error](const std::string& what, const std::string& at) {
      if (what == call && at == path) env.fail_call(kind, at, error, 1);
    });
  };
  const std::string staged = out + "/checkpoints/step-000002.partial";
  faults.push_back({"the checkpoint's swap into place (rename, then exchange once it exists)",
                    [=] { fail_when("rename", staged, EnvCall::kRename, EXDEV); }});
  faults.push_back({"fsync of the staged directory",
                    [=] { fail_when("fsync of the directory", staged, EnvCall::kSyncDirectory, EIO); }});
  faults.push_back({"fsync of checkpoints/ after the swap (the checkpoint is in place, latest is not)",
                    [=] { fail_when("fsync of the directory", out + "/checkpoints", EnvCall::kSyncDirectory, EIO); }});

  for (const Fault& fault : faults) {
    INFO(fault.what);
    env.clear();
    fault.arm();
    CHECK_THROWS_AS(run.save(engine, loader->state().to_json()), IoException);
    CHECK(env.faults_injected() > 0);
    env.clear();
    CHECK(latest_checkpoint(out) == first);
    CHECK_FALSE(fs::exists(out + "/checkpoints/step-000002.partial"));
    CHECK_FALSE(fs::exists(out + "/checkpoints/latest.tmp"));
    for (const auto& [name, bytes] : first_files) CHECK(file_bytes(first + "/" + name) == bytes);
    Engine loaded(tiny(), base_config(Mode::kZeroOffload));
    loaded.load(first);
    CHECK(loaded.steps_taken() == 1);
  }
  run.save(engine, loader->state().to_json());
  CHECK(latest_checkpoint(out) == out + "/checkpoints/step-000002");
}

TEST_CASE("a fault at any file of an export leaves the previous export whole") {
  TempDir dir;
  FaultInjectingEnv env;
  EngineConfig config = base_config(Mode::kGpu);
  config.checkpoint_env = &env;
  Engine engine(tiny(), config);
  const std::string export_dir = dir.file("hf");
  const std::map<std::string, std::string> extras = {{"tokenizer.json", "{\"version\": \"1.0\"}"},
                                                     {"generation_config.json", "{\"eos_token_id\": 2}"}};
  engine.export_pretrained(export_dir, Precision::kBF16, extras);
  std::map<std::string, std::string> before;
  for (const std::string& name : names_in(export_dir)) before[name] = file_bytes(export_dir + "/" + name);
  REQUIRE(before.count("tokenizer.json"));
  REQUIRE(before.count("model.safetensors"));
  auto loader = demo_loader(3);
  engine.train_step(loader->next());

  std::vector<std::pair<std::string, std::function<void()>>> faults;
  for (const std::string file : {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"}) {
    const std::string part = "/" + file;
    faults.emplace_back("ENOSPC writing " + file, [&env, part] { env.fail(IoOp::kWrite, part, 0, ENOSPC); });
    faults.emplace_back("EIO writing " + file, [&env, part] { env.fail(IoOp::kWrite, part, 0, EIO); });
    faults.emplace_back("fdatasync of " + file, [&env, part] { env.fail_call(EnvCall::kSync, part, EIO); });
    faults.emplace_back("rename of " + file, [&env, part] { env.fail_call(EnvCall::kRename, part, EIO); });
  }
  faults.emplace_back("the export's swap into place", [&env, export_dir] {
    env.on_each_call([&env, export_dir](const std::string& what, const std::string& path) {
      if (what == "rename" && path == export_dir + ".partial") env.fail_call(EnvCall::kRename, path, EIO, 1);
    });
  });
  for (const auto& [what, arm] : faults) {
    INFO(what);
    env.clear();
    arm();
    CHECK_THROWS_AS(engine.export_pretrained(export_dir, Precision::kBF16, extras), IoException);
    env.clear();
    CHECK_FALSE(fs::exists(export_dir + ".partial"));
    std::map<std::string, std::string> after;
    for (const std::string& name : names_in(export_dir)) after[name] = file_bytes(export_dir + "/" + name);
    CHECK(after == before);
  }
  engine.export_pretrained(export_dir, Precision::kBF16, extras);
  CHECK(file_bytes(export_dir + "/model.safetensors") != before["model.safetensors"]);
  CHECK(file_bytes(export_dir + "/tokenizer.json") == before["tokenizer.json"]);
  CHECK(models::from_pretrained(export_dir).num_blocks() == tiny().num_blocks());
}

TEST_CASE("a flipped bit in a checkpoint is caught on load, naming the tensor and its file") {
  TempDir dir;
  Engine engine(tiny(), base_config(Mode::kZeroOffload));
  auto loader = demo_loader(3);
  engine.train_step(loader->next());
  const std::string checkpoint = dir.file("ckpt");
  engine.save(checkpoint, loader->state().to_json());
  const Json state = Json::parse(file_bytes(checkpoint + "/trainer_state.json"));
  CHECK(state["checksums"]["algorithm"] == "xxh64");
  CHECK(state["checksums"]["files"]["model.safetensors"].size() > 5);

  const std::string weights = checkpoint + "/model.safetensors";
  const std::string optimizer = checkpoint + "/optimizer.safetensors";
  const std::string weight_name = safetensors::Reader(weights).header().tensors.at(3).name;
  const std::string state_name = safetensors::Reader(optimizer).header().tensors.at(5).name;
  const std::string clean_weights = file_bytes(weights), clean_optimizer = file_bytes(optimizer);

  SECTION("in the weights") {
    flip_bit(weights, tensor_offset(weights, weight_name) + 6);
    Engine loaded(tiny(), base_config(Mode::kZeroOffload));
    CHECK_THROWS_WITH(loaded.load(checkpoint), Contains("checkpoint '" + checkpoint + "' is corrupt") &&
                                                   Contains("tensor '" + weight_name + "' in model.safetensors") &&
                                                   Contains("does not match the checksum"));
  }
  SECTION("in an optimizer state") {
    flip_bit(optimizer, tensor_offset(optimizer, state_name) + 2);
    Engine loaded(tiny(), base_config(Mode::kZeroOffload));
    CHECK_THROWS_WITH(loaded.load(checkpoint),
                      Contains("tensor '" + state_name + "' in optimizer.safetensors"));
  }
  SECTION("verify none reads it anyway; sampled checks part of it") {
    flip_bit(weights, tensor_offset(weights, weight_name) + 6);
    EngineConfig unchecked = base_config(Mode::kZeroOffload);
    unchecked.verify = Verify::kNone;
    Engine loaded(tiny(), unchecked);
    loaded.load(checkpoint);
    CHECK(loaded.steps_taken() == 1);
    CHECK(parse_verify("sampled") == Verify::kSampled);
    CHECK_THROWS_WITH(parse_verify("most"), Contains("valid are auto, full, sampled and none"));
    CHECK(engine_config_from_json(R"({"verify": "none"})").verify == Verify::kNone);
  }
}

TEST_CASE("latest is relative: a run resumes from another working directory and after it moved") {
  TempDir dir;
  char here[PATH_MAX];
  REQUIRE(::getcwd(here, sizeof here) != nullptr);
  REQUIRE(::chdir(dir.path().c_str()) == 0);
  std::vector<double> uninterrupted;
  {
    RunDirectory run(run_options("run"));  // as typed: relative to this working directory
    Engine engine(tiny(), base_config(Mode::kZeroOffload));
    auto loader = demo_loader(3);
    run.begin(0);
    train_to(engine, *loader, run, 2, /*save_each=*/true);
  }
  REQUIRE(::chdir(here) == 0);
  CHECK(file_bytes(dir.file("run/checkpoints/latest")) == "checkpoints/step-000002\n");
  REQUIRE(::rename(dir.file("run").c_str(), dir.file("moved").c_str()) == 0);

  RunDirectory run(run_options(dir.file("moved"), "auto"));
  CHECK(run.resume_from() == dir.file("moved") + "/checkpoints/step-000002");
  Engine engine(tiny(), base_config(Mode::kZeroOffload));
  auto loader = demo_loader(3);
  loader->restore(data::LoaderState::from_json(engine.load(run.resume_from())));
  CHECK(engine.steps_taken() == 2);
  CHECK(run.begin(2) == 0);
  CHECK(run.last_saved_step() == 2);
  train_to(engine, *loader, run, 3, /*save_each=*/true);
  CHECK(latest_checkpoint(dir.file("moved")) == dir.file("moved") + "/checkpoints/step-000003");
}

TEST_CASE("resume auto with no checkpoint starts fresh, and a damaged latest is an error") {
  TempDir dir;
  const std::string out = dir.file("run");
  {
    RunDirectory fresh(run_options(out, "auto"));
    CHECK(fresh.resume_from().empty());
    CHECK_THAT(fresh.start_note(), Contains("no checkpoint under " + out + " yet: starting fresh"));
  }
  {
    RunDirectory run(run_options(out, "auto"));
    Engine engine(tiny(), base_config(Mode::kGpu));
    auto loader = demo_loader(3);
    run.begin(0);
    train_to(engine, *loader, run, 2, /*save_each=*/true);
  }
  const std::string latest = out + "/checkpoints/latest";
  SECTION("empty") {
    std::ofstream(latest, std::ios::trunc).flush();
    CHECK_THROWS_WITH(RunDirectory(run_options(out, "auto")),
                      Contains(latest + " is empty") && Contains("step-000001, step-000002"));
  }
  SECTION("naming a checkpoint that is gone") {
    fs::remove_tree(out + "/checkpoints/step-000002");
    CHECK_THROWS_WITH(latest_checkpoint(out), Contains("names checkpoints/step-000002, which is not there"));
  }
  SECTION("damaged") {
    std::ofstream(latest, std::ios::trunc) << "\x01\x02garbage";
    CHECK_THROWS_WITH(latest_checkpoint(out), Contains("which is not a checkpoint of this run"));
  }
  SECTION("missing, after a crash between a checkpoint and its latest: the newest checkpoint") {
    fs::remove_tree(latest);
    RunDirectory run(run_options(out, "auto"));
    CHECK(run.resume_from() == out + "/checkpoints/step-000002");
    CHECK_THAT(run.start_note(), Contains("is missing"));
  }
  SECTION("written by an earlier ferry, as the job typed --out") {
    std::ofstream(latest, std::ios::trunc) << "some/where/run/checkpoints/step-000001\n";
    CHECK(latest_checkpoint(out) == out + "/checkpoints/step-000001");
  }
}

TEST_CASE("a new run into an earlier one is refused unless it overwrites") {
  TempDir dir;
  const std::string out = dir.file("run");
  {
    RunDirectory run(run_options(out));
    Engine engine(tiny(), base_config(Mode::kGpu));
    auto loader = demo_loader(3);
    run.begin(0);
    train_to(engine, *loader, run, 1, /*save_each=*/true);
  }
  std::ofstream(out + "/notes.txt") << "mine";
  CHECK_THROWS_WITH(RunDirectory(run_options(out)), Contains("holds an earlier run") &&
                                                         Contains("--resume auto") && Contains("--overwrite"));
  RunOptions overwrite = run_options(out);
  overwrite.overwrite = true;
  RunDirectory run(overwrite);
  CHECK(run.resume_from().empty());
  CHECK(fs::exists(out + "/checkpoints/step-000001"));  // nothing removed before the job begins
  run.begin(0);
  CHECK_FALSE(fs::exists(out + "/checkpoints/step-000001"));
  CHECK(file_bytes(out + "/metrics.jsonl").empty());
  CHECK(file_bytes(out + "/notes.txt") == "mine");  // not ferry's: left alone
}

TEST_CASE("resuming drops the metrics records after the checkpoint, and a torn last line") {
  TempDir dir;
  const std::string out = dir.file("run");
  {
    RunDirectory run(run_options(out));
    Engine engine(tiny(), base_config(Mode::kGpu));
    auto loader = demo_loader(3);
    run.begin(0);
    train_to(engine, *loader, run, 2, /*save_each=*/true);
    train_to(engine, *loader, run, 4, /*save_each=*/false);  // two records past the checkpoint
  }
  std::ofstream(out + "/metrics.jsonl", std::ios::app) << "{\"step\": 5, \"lo";  // a kill mid-line
  RunDirectory run(run_options(out, "auto"));
  REQUIRE(run.resume_from() == out + "/checkpoints/step-000002");
  CHECK(run.begin(2) == 3);
  std::vector<std::int64_t> steps;
  std::istringstream lines(file_bytes(out + "/metrics.jsonl"));
  for (std::string line; std::getline(lines, line);) steps.push_back(Json::parse(line)["step"]);
  CHECK(steps == std::vector<std::int64_t>{1, 2});
  run.log(Json{{"step", 3}, {"loss", 1.0}}.dump());
  CHECK(file_bytes(out + "/metrics.jsonl").find("{\"loss\":1.0,\"step\":3}\n") != std::string::npos);
}

TEST_CASE("rotation keeps the newest checkpoints and never the one latest names") {
  TempDir dir;
  const std::string out = dir.file("run");
  RunOptions options = run_options(out);
  options.keep_checkpoints = 2;
  {
    RunDirectory run(options);
    Engine engine(tiny(), base_config(Mode::kGpu));
    auto loader = demo_loader(3);
    run.begin(0);
    train_to(engine, *loader, run, 4, /*save_each=*/true);
  }
  CHECK(names_in(out + "/checkpoints") == std::vector<std::string>{"latest", "step-000003", "step-000004"});

  // Resumed from an older checkpoint, the one it saves next is `latest` although older ones exist.
  options.resume = out + "/checkpoints/step-000003";
  RunDirectory run(options);
  Engine engine(tiny(), base_config(Mode::kGpu));
  auto loader = demo_loader(3);
  loader->restore(data::LoaderState::from_json(engine.load(run.resume_from())));
  run.begin(engine.steps_taken());
  CHECK(run.last_saved_step() == 3);
  fs::remove_tree(out + "/checkpoints/step-000004");
  std::ofstream(out + "/checkpoints/latest", std::ios::trunc) << "checkpoints/step-000003\n";
  fs::make_directories(out + "/checkpoints/step-000008");  // newer by name, not `latest`
  fs::make_directories(out + "/checkpoints/step-000009");
  train_to(engine, *loader, run, 4, /*save_each=*/true);
  CHECK(names_in(out + "/checkpoints") ==
        std::vector<std::string>{"latest", "step-000004", "step-000008", "step-000009"});
  CHECK(latest_checkpoint(out) == out + "/checkpoints/step-000004");
}

TEST_CASE("a second job on a run directory is refused, naming the first") {
  TempDir dir;
  const std::string out = dir.file("run");
  RunDirectory first(run_options(out));
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int status = 1;
    try {
      RunDirectory second(run_options(out, "auto"));
    } catch (const DirectoryBusy& busy) {
      const std::string message = busy.what();
      status = message.find("output directory '" + out + "' is in use") != std::string::npos &&
                       message.find("pid " + std::to_string(::getppid())) != std::string::npos
                   ? 0
                   : 2;
    } catch (...) {
      status = 3;
    }
    ::_exit(status);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}
