// `ferry finetune` as a user runs it: the built binary, real files, bad input refused before any
// weight is read, and a model that cannot train stopped with an error instead of exit 0.

#include <cstdio>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "cli/run_ferry.h"
#include "ferry/fs.h"
#include "ferry/model.h"
#include "support/catch.h"
#include "support/temp_dir.h"

namespace ferry::cli {
namespace {

using Catch::Contains;

using Run = testing::FerryRun;
using testing::run_ferry;

// A demo job small enough for a test: planned with a preset's figures, not a calibration.
std::string small_job(const testing::TempDir& dir) {
  return "finetune --hardware h100 --batch 4 --eval-problems 1 --export none --out " + dir.file("run");
}

std::vector<nlohmann::json> metrics(const testing::TempDir& dir) {
  std::ifstream in(dir.file("run/metrics.jsonl"));
  std::vector<nlohmann::json> records;
  for (std::string line; std::getline(in, line);) records.push_back(nlohmann::json::parse(line));
  return records;
}

TEST_CASE("finetune refuses bad flags and job-file values, naming the setting, the value and the range") {
  testing::TempDir dir;
  struct Case {
    std::string arguments, message;
  };
  std::ofstream(dir.file("text.yaml")) << "steps: 10\nseq: \"abc\"\n";
  std::ofstream(dir.file("typo.yaml")) << "seqq: 4\n";
  const Case cases[] = {
      {"--steps 3.5", "--steps 3.5 is invalid: not a whole number: steps must be auto or an integer >= 1"},
      {"--steps 10x", "--steps 10x is invalid: not an integer"},
      {"--log-every 0", "--log-every 0 is invalid: log_every must be an integer >= 1"},
      {"--lr abc", "--lr abc is invalid: not a number: lr must be auto or a number >= 0"},
      {"--gpu-budget 0.0001", "less than one byte"},
      {"--host-budget 1e30", "2^63"},
      {"--stpes 10", "unknown flag '--stpes' (did you mean 'steps'?)"},
      {"--config " + dir.file("text.yaml"), "seq = \"abc\" in " + dir.file("text.yaml") + " is invalid: not an integer"},
      {"--config " + dir.file("typo.yaml"), "unknown setting 'seqq' in " + dir.file("typo.yaml") +
                                                " (did you mean 'seq'?)"},
  };
  for (const Case& bad : cases) {
    INFO(bad.arguments);
    const Run run = run_ferry(small_job(dir) + " " + bad.arguments);
    CHECK(run.exit_code == 1);
    CHECK_THAT(run.output, Contains(bad.message));
    CHECK_FALSE(fs::exists(dir.file("run")));  // refused before the job wrote anything
  }
}

TEST_CASE("finetune --steps 1e1 runs exactly ten steps") {
  testing::TempDir dir;
  const Run run = run_ferry(small_job(dir) + " --steps 1e1 --log-every 5");
  INFO(run.output);
  REQUIRE(run.exit_code == 0);
  const std::vector<nlohmann::json> records = metrics(dir);
  REQUIRE(records.size() == 10);
  CHECK(records.back()["step"] == 10);
  CHECK(records.back()["skipped"] == false);
}

TEST_CASE("finetune --mode auto plans again from a profile of its first plan, and trains as the gpu mode does") {
  testing::TempDir on_gpu, placed;
  const std::string common = " --steps 3 --device cpu --precision fp32 --log-every 1";
  const Run reference = run_ferry(small_job(on_gpu) + common + " --mode gpu");
  REQUIRE(reference.exit_code == 0);
  // 2 MiB holds one part's optimizer state: the CPU updates the other three.
  const Run run = run_ferry(small_job(placed) + common + " --mode auto --gpu-budget 2MiB");
  INFO(run.output);
  REQUIRE(run.exit_code == 0);
  CHECK_THAT(run.output, Contains("auto: profiling two steps of this placement, every block recomputed") &&
                             Contains("compute: measured at batch 4 x seq 16") &&
                             Contains("CPU updates: measured in the step") && Contains("measured / predicted"));
  const std::vector<nlohmann::json> expected = metrics(on_gpu), got = metrics(placed);
  REQUIRE(got.size() == 3);
  REQUIRE(expected.size() == 3);
  for (std::size_t step = 0; step < got.size(); ++step) CHECK(got[step]["loss"] == expected[step]["loss"]);

  // `ferry plan --profile` plans the same job from the profile the run wrote.
  const std::string plan = "plan --hardware h100 --batch 4 --precision fp32 --mode auto --gpu-budget 2MiB";
  const Run replanned = run_ferry(plan + " --profile " + placed.file("run/profile.json"));
  INFO(replanned.output);
  CHECK(replanned.exit_code == 0);
  CHECK_THAT(replanned.output, Contains("compute: measured at batch 4 x seq 16") &&
                                   Contains("CPU updates: measured in the step"));
  std::ofstream(placed.file("bad.json")) << "{\"batch\": 4}";
  const Run bad = run_ferry(plan + " --profile " + placed.file("bad.json"));
  CHECK(bad.exit_code == 1);
  CHECK_THAT(bad.output, Contains(placed.file("bad.json") + ": measured compute has no 'seq'"));
}

TEST_CASE("ferry launch runs finetune as two ranks, and stops them all when they fail") {
  testing::TempDir dir;
  const Run two = run_ferry("launch --nproc-per-node 2 --master-port 0 -- " + small_job(dir) + " --steps 3 --device cpu");
  INFO(two.output);
  REQUIRE(two.exit_code == 0);
  CHECK_THAT(two.output, Contains("launch: 2 ranks of 'ferry finetune'") && Contains("data parallel: 2 ranks"));
  CHECK(metrics(dir).size() == 3);  // rank 0 alone writes them

  // fuyou's profiling step runs on both ranks over one NVMe directory, and both plan alike.
  testing::TempDir shared;
  const Run fuyou = run_ferry("launch --nproc-per-node 2 --master-port 0 -- " + small_job(shared) +
                              " --steps 2 --device cpu --mode fuyou --nvme " + shared.subdir("nvme"));
  INFO(fuyou.output);
  CHECK(fuyou.exit_code == 0);
  CHECK_THAT(fuyou.output, Contains("fuyou: profiling two steps"));

  const Run failing = run_ferry("launch --nproc-per-node 2 --master-port 0 -- finetune --stpes 3");
  CHECK(failing.exit_code == 1);
  CHECK_THAT(failing.output, Contains("exited with 1") && Contains("of 2: unknown flag '--stpes'"));
  const Run no_command = run_ferry("launch --nproc-per-node 2");
  CHECK(no_command.exit_code != 0);
  CHECK_THAT(no_command.output, Contains("after --"));
  const Run no_ranks = run_ferry("launch --nproc-per-node 0 -- info");
  CHECK(no_ranks.exit_code != 0);
  CHECK_THAT(no_ranks.output, Contains("--nproc-per-node 0 is invalid"));
}

TEST_CASE("a model with NaN weights stops with an error after max_nonfinite_losses, saving nothing") {
  testing::TempDir dir;
  LayeredModel model = models::build(models::preset("tiny-llama"), 1);
  {
    torch::NoGradGuard no_grad;
    model.blocks().front()->parameters().front().fill_(std::numeric_limits<float>::quiet_NaN());
  }
  models::save_pretrained(model, dir.file("nan-model"));
  const std::string job = small_job(dir) + " --model " + dir.file("nan-model") + " --save-every 2";

  Run run = run_ferry(job + " --steps 20 --max-nonfinite-losses 3");
  INFO(run.output);
  CHECK(run.exit_code == 1);
  CHECK_THAT(run.output, Contains("the loss was not finite (NaN or Inf) at the last 3 steps (to step 3; "
                                  "max_nonfinite_losses = 3): the job stops without saving"));
  std::vector<nlohmann::json> records = metrics(dir);
  REQUIRE(records.size() == 3);
  for (const nlohmann::json& record : records) {
    CHECK(record["loss"].is_null());  // NaN in JSON
    CHECK(record["skipped"] == true);
  }
  CHECK_THAT(run.output, Contains("no checkpoint at step 2: its loss is not finite"));
  CHECK_FALSE(fs::exists(dir.file("run/checkpoints/step-000002")));
  CHECK_FALSE(fs::exists(dir.file("run/checkpoints/latest")));

  // A job that ends below the limit still fails: its last loss was not finite.
  fs::remove_tree(dir.file("run"));
  run = run_ferry(job + " --steps 2 --max-nonfinite-losses 10");
  CHECK(run.exit_code == 1);
  CHECK_THAT(run.output, Contains("at the last 2 steps (to step 2"));
  CHECK_FALSE(fs::exists(dir.file("run/checkpoints/latest")));
}

}  // namespace
}  // namespace ferry::cli
