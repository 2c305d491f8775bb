// The one-step delayed parameter update (DelayedUpdateConfig) against its plain reading: an
// engine without it, driven so that each step's gradients are computed with the parameters of
// before the previous step's update and applied to the latest ones.

#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "ferry/data.h"
#include "ferry/engine.h"
#include "ferry/model.h"
#include "support/skip.h"
#include "support/temp_dir.h"

// glog, which LibTorch includes, defines a CHECK macro of its own; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

#include "engine/training.h"

using namespace ferry;
using namespace ferry::testing;

namespace {

constexpr int kSteps = 20;

Engine make_engine(EngineConfig config, std::uint64_t seed = 7, const std::string& preset = "tiny-llama") {
  return Engine(models::build(models::preset(preset), seed), config);
}

std::vector<torch::Tensor> parameters_of(const Engine& engine) {
  std::vector<torch::Tensor> values;
  for (const torch::Tensor& parameter : engine.model().parameters()) {
    values.push_back(parameter.detach().clone());
  }
  return values;
}

// Writes `values` into the model's parameters, which are views of the device copies.
void assign_parameters(const Engine& engine, const std::vector<torch::Tensor>& values) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> parameters = engine.model().parameters();
  for (std::size_t i = 0; i < parameters.size(); ++i) parameters[i].copy_(values[i]);
}

bool same_parameters(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!torch::equal(a[i].to(torch::kCPU), b[i].to(torch::kCPU))) return false;
  }
  return a.size() == b.size();
}

struct Run {
  std::vector<StepResult> steps;
  std::vector<torch::Tensor> weights;  // after the last step, flushed
};

// The plain reading of the delayed update, on an engine that updates at once (config.mode, with
// the delayed update off): when step t-1 was a delayed one, step t's forward and backward run
// with the parameters of before step t-1's update, and step() applies the gradients to the
// latest ones. A flush after step `flush_after` sends the pending update up: the step after it
// computes with the latest parameters again. The model's parameters are the device copies that
// forward and backward read; the update reads the master (the same memory in fp32 gpu mode), so
// they are put back before step().
Run plain_reading(EngineConfig config, int steps, std::optional<int> flush_after = std::nullopt,
                  const std::string& preset = "tiny-llama") {
  const DelayedUpdateConfig delayed = config.delayed_update;
  config.delayed_update = {};
  // Forward and backward by hand are batch-major; both orders agree bit for bit (untied heads).
  config.micro_batch_order = MicroBatchOrder::kBatchMajor;
  Engine engine = make_engine(config, 7, preset);
  auto loader = demo_loader(11);
  Run run;
  std::vector<torch::Tensor> before_previous;
  for (int t = 1; t <= steps; ++t) {
    const std::vector<torch::Tensor> latest = parameters_of(engine);
    const bool stale = t - 1 > delayed.warmup_steps && flush_after != t - 1;
    if (stale) assign_parameters(engine, before_previous);
    for (std::int64_t m = 0; m < config.grad_accumulation; ++m) {
      torch::Tensor loss = engine.forward(loader->next());
      engine.backward(loss);
    }
    if (stale) assign_parameters(engine, latest);
    run.steps.push_back(engine.step());
    before_previous = latest;
  }
  run.weights = parameters_of(engine);
  return run;
}

Run delayed_run(const EngineConfig& config, int steps, std::optional<int> flush_after = std::nullopt,
                const std::string& preset = "tiny-llama") {
  REQUIRE(config.delayed_update.enabled);
  Engine engine = make_engine(config, 7, preset);
  auto loader = demo_loader(11);
  Run run;
  while (static_cast<int>(run.steps.size()) < steps) {
    if (auto result = engine.train_step(loader->next())) {
      run.steps.push_back(*result);
      if (flush_after == result->step) engine.flush();
    }
  }
  engine.flush();
  run.weights = parameters_of(engine);
  return run;
}

void require_identical(const Run& a, const Run& b) {
  require_same_steps(a.steps, b.steps);
  CHECK(same_parameters(a.weights, b.weights));
}

EngineConfig delayed_config() {
  EngineConfig config = base_config(Mode::kZeroOffload);
  config.delayed_update.enabled = true;
  return config;
}

// The reference: gpu mode, which updates in step() and equals zero-offload bit for bit on the
// CPU (engine_test). plain_reading takes the delayed update's warm-up from it and runs without it.
EngineConfig as_reference(EngineConfig config) {
  config.mode = Mode::kGpu;
  return config;
}

}  // namespace

TEST_CASE("a delayed update equals its plain reading step by step in fp32") {
  EngineConfig config = delayed_config();
  std::string preset = "tiny-llama";
  SECTION("from the first step") {}
  SECTION("after warm-up steps") { config.delayed_update.warmup_steps = 3; }
  // The head's backward adds to the stem's gradients, whose host copy the stem's pending update
  // reads until the end of backward.
  SECTION("with a tied head") { preset = "tiny-gpt2"; }
  SECTION("with gradient accumulation, clipping and a schedule") {
    config.grad_accumulation = 2;
    config.max_grad_norm = 0.5;
    config.schedule = {LrSchedule::kCosine, 3, kSteps, 0.1};
  }
  SECTION("in layer-major order, with sgd") {
    config.grad_accumulation = 2;
    config.micro_batch_order = MicroBatchOrder::kLayerMajor;
    config.optimizer.kind = OptimizerKind::kSgd;
    config.optimizer.momentum = 0.9;
    config.optimizer.lr = 0.05;
  }
  INFO(preset);
  const Run delayed = delayed_run(config, kSteps, std::nullopt, preset);
  const Run reference = plain_reading(as_reference(config), kSteps, std::nullopt, preset);
  require_identical(delayed, reference);

  // Against updating at once: the same until the first delayed step has been applied, which
  // computed with the latest parameters itself; different after it. And training works.
  const std::size_t fresh = static_cast<std::size_t>(config.delayed_update.warmup_steps) + 1;
  EngineConfig at_once = as_reference(config);
  at_once.delayed_update.warmup_steps = kSteps;
  const Run undelayed = plain_reading(at_once, static_cast<int>(fresh) + 1, std::nullopt, preset);
  for (std::size_t i = 0; i < fresh; ++i) CHECK(delayed.steps[i].loss == undelayed.steps[i].loss);
  CHECK(delayed.steps[fresh].loss != undelayed.steps[fresh].loss);
  CHECK(delayed.steps.back().loss < delayed.steps.front().loss);
}

TEST_CASE("a delayed update keeps loss-scale skips and bf16 parameters right") {
  EngineConfig config = delayed_config();
  config.precision = Precision::kBF16;
  config.loss_scale.enabled = true;
  config.loss_scale.initial_scale = 1e39;  // overflows bf16 gradients until it backs off
  config.loss_scale.growth_interval = 5;
  const Run delayed = delayed_run(config, kSteps);
  const Run reference = plain_reading(as_reference(config), kSteps);
  require_identical(delayed, reference);
  int skipped = 0;
  for (const StepResult& step : delayed.steps) skipped += step.skipped;
  CHECK(skipped >= 1);
  CHECK_FALSE(delayed.steps.back().skipped);
}

TEST_CASE("flush sends the pending update up, and evaluate and save flush first") {
  EngineConfig config = delayed_config();
  SECTION("flush between steps") {
    const Run delayed = delayed_run(config, 12, /*flush_after=*/6);
    const Run reference = plain_reading(as_reference(config), 12, 6);
    require_identical(delayed, reference);
  }
  SECTION("the device lags the master by one update until flush") {
    Engine engine = make_engine(config);
    EngineConfig at_once = as_reference(config);
    at_once.delayed_update = {};
    Engine reference = make_engine(at_once);
    auto loader = demo_loader(4);
    const data::Batch batch = loader->next();
    engine.train_step(batch);
    reference.train_step(batch);
    const std::vector<torch::Tensor> before = parameters_of(engine);
    CHECK_FALSE(same_parameters(before, parameters_of(reference)));
    CHECK(engine.evaluate(batch) == reference.evaluate(batch));  // flushes
    CHECK(same_parameters(parameters_of(engine), parameters_of(reference)));
    engine.flush();  // nothing pending: a no-op
    CHECK(same_parameters(parameters_of(engine), parameters_of(reference)));
  }
  SECTION("not between the micro-batches of a step") {
    config.grad_accumulation = 2;
    Engine engine = make_engine(config);
    auto loader = demo_loader(4);
    for (int i = 0; i < 3; ++i) engine.train_step(loader->next());
    CHECK_THROWS_WITH(engine.flush(), Catch::Contains("flush() in the middle of a step (1 of 2"));
    engine.train_step(loader->next());
    engine.flush();
  }
}

TEST_CASE("a delayed update resumes from a checkpoint with the losses of an uninterrupted run") {
  EngineConfig config = delayed_config();
  config.delayed_update.warmup_steps = 2;
  config.schedule = {LrSchedule::kLinear, 2, 12, 0.0};
  TempDir dir;
  std::vector<double> uninterrupted;
  {
    Engine engine = make_engine(config);
    uninterrupted = losses_saving_at(engine, 12, 6, dir.file("ckpt"));
  }
  Engine resumed = make_engine(config, /*seed=*/99);  // other weights, overwritten
  require_resumed_losses(resumed, dir.file("ckpt"), 6, uninterrupted);
}

TEST_CASE("a delayed update is refused where it does not apply, naming why") {
  TempDir dir;
  EngineConfig config = delayed_config();
  config.mode = Mode::kGpu;
  CHECK_THROWS_WITH(make_engine(config), Catch::Contains("zero-offload mode only") &&
                                             Catch::Contains("gpu mode") &&
                                             Catch::Contains("no CPU update to hide"));
  // `ferry plan` sizes through the same checks.
  CHECK_THROWS_WITH(engine_demand(part_shapes(models::preset("tiny-llama")), config),
                    Catch::Contains("zero-offload mode only"));
  config.mode = Mode::kFuyou;
  config.nvme_directories = {dir.path()};
  CHECK_THROWS_WITH(make_engine(config), Catch::Contains("fuyou mode") && Catch::Contains("in backward"));
  config = delayed_config();
  config.mode = Mode::kZo2;
  CHECK_THROWS_WITH(make_engine(config), Catch::Contains("zo2 mode") && Catch::Contains("already"));
  config = delayed_config();
  config.delayed_update.warmup_steps = -1;
  CHECK_THROWS_WITH(make_engine(config), Catch::Contains("warmup_steps = -1"));

  const EngineConfig parsed =
      engine_config_from_json(R"({"delayed_update": true, "delayed_update_warmup": 3})");
  CHECK(parsed.delayed_update.enabled);
  CHECK(parsed.delayed_update.warmup_steps == 3);
  CHECK_THROWS_WITH(engine_config_from_json(R"({"delayed_update": 1})"),
                    Catch::Contains("'delayed_update' has the wrong type"));
}

TEST_CASE("on a CUDA device a delayed update follows its plain reading") {
  if (ferry::testing::skip_without_cuda("the device run of the delayed update runs on the GPU machine")) return;
  for (Precision precision : {Precision::kF32, Precision::kBF16}) {
    INFO(to_string(precision));
    EngineConfig config = delayed_config();
    config.device = torch::kCUDA;
    config.precision = precision;
    config.grad_accumulation = 2;
    const Run delayed = delayed_run(config, kSteps);
    // Note: the reference must update in step(), after plain_reading has put the latest
    // parameters back. Zero-offload updating at once uploads each part's new parameters during
    // backward, and that assignment would overwrite them. gpu mode's CUDA AdamW computes what the
    // CPU kernels do; the device's backward may sum in another order from run to run.
    const Run reference = plain_reading(as_reference(config), kSteps);
    const double tolerance = precision == Precision::kF32 ? 1e-5 : 1e-2;
    for (std::size_t i = 0; i < reference.steps.size(); ++i) {
      INFO("step " << i + 1);
      CHECK(delayed.steps[i].loss == Approx(reference.steps[i].loss).epsilon(tolerance));
    }
    CHECK(delayed.steps.back().loss < delayed.steps.front().loss);
  }
}
