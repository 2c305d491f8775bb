// The offload modes against the gpu reference mode, with the same seeds and data.

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <cmath>
#include <thread>

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

Engine make_engine(const std::string& preset, EngineConfig config, std::uint64_t seed = 7) {
  models::ModelConfig model_config = models::preset(preset);
  return Engine(models::build(model_config, seed), config);
}

struct Run {
  std::vector<StepResult> steps;
  std::vector<torch::Tensor> weights;  // the model's parameters afterwards, as fp32 on the CPU
};

Run train(const std::string& preset, const EngineConfig& config, int steps) {
  Engine engine = make_engine(preset, config);
  auto loader = demo_loader(11);
  Run run;
  while (static_cast<int>(run.steps.size()) < steps) {
    if (auto result = engine.train_step(loader->next())) run.steps.push_back(*result);
  }
  for (const torch::Tensor& parameter : engine.model().parameters()) {
    run.weights.push_back(parameter.detach().to(torch::kCPU, torch::kFloat).clone());
  }
  return run;
}

void require_identical(const Run& a, const Run& b) {
  require_same_steps(a.steps, b.steps);
  REQUIRE(a.weights.size() == b.weights.size());
  for (std::size_t i = 0; i < a.weights.size(); ++i) {
    INFO("parameter " << i);
    CHECK(torch::equal(a.weights[i], b.weights[i]));
  }
}

}  // namespace

TEST_CASE("zero-offload equals the gpu mode exactly in fp32") {
  const std::string preset = GENERATE("tiny-llama", "tiny-gpt2");
  INFO(preset);
  EngineConfig config = base_config(Mode::kGpu);
  SECTION("plain") {}
  SECTION("with gradient accumulation and clipping") {
    config.grad_accumulation = 2;
    config.max_grad_norm = 0.5;
    config.schedule = {LrSchedule::kCosine, 5, 30, 0.1};
  }
  SECTION("with kept graphs and sgd") {
    config.keep_graph_blocks = 1;
    config.optimizer.kind = OptimizerKind::kSgd;
    config.optimizer.momentum = 0.9;
    config.optimizer.lr = 0.05;
  }
  Run reference = train(preset, config, 30);
  config.mode = Mode::kZeroOffload;
  Run offloaded = train(preset, config, 30);
  require_identical(reference, offloaded);
  // And training works: the loss falls.
  CHECK(reference.steps.back().loss < reference.steps.front().loss);
}

TEST_CASE("zero-offload follows the gpu mode in bf16") {
  EngineConfig config = base_config(Mode::kGpu);
  config.precision = Precision::kBF16;
  Run reference = train("tiny-llama", config, 30);
  config.mode = Mode::kZeroOffload;
  Run offloaded = train("tiny-llama", config, 30);
  // Both keep an fp32 master and run the same kernels on the CPU, so bf16 agrees exactly here;
  // on a CUDA device the tolerance is stated in the device test below.
  require_identical(reference, offloaded);
  CHECK(reference.steps.back().loss < reference.steps.front().loss);
}

TEST_CASE("dynamic loss scaling skips overflowing steps in both modes alike") {
  EngineConfig config = base_config(Mode::kGpu);
  config.precision = Precision::kBF16;
  config.loss_scale.enabled = true;
  config.loss_scale.initial_scale = 1e39;  // overflows bf16 gradients until it backs off
  config.loss_scale.growth_interval = 5;
  Run reference = train("tiny-llama", config, 20);
  config.mode = Mode::kZeroOffload;
  Run offloaded = train("tiny-llama", config, 20);
  require_identical(reference, offloaded);
  int skipped = 0;
  for (const StepResult& step : reference.steps) skipped += step.skipped;
  CHECK(skipped >= 1);
  CHECK(reference.steps.front().skipped);
  CHECK(std::isnan(reference.steps.front().grad_norm));
  CHECK_FALSE(reference.steps.back().skipped);
  CHECK(reference.steps.back().loss_scale < 1e39);
}

TEST_CASE("a budget too small fails up front naming the shortfall") {
  EngineConfig config = base_config(Mode::kZeroOffload);
  config.host_budget_bytes = 64 * 1024;
  CHECK_THROWS_WITH(make_engine("tiny-llama", config),
                    Catch::Contains("host budget is 64.00 KiB") && Catch::Contains("short") &&
                        Catch::Contains("optimizer states"));
  config = base_config(Mode::kGpu);
  config.gpu_budget_bytes = 64 * 1024;
  CHECK_THROWS_WITH(make_engine("tiny-llama", config),
                    Catch::Contains("gpu budget is 64.00 KiB") && Catch::Contains("zero-offload"));
}

TEST_CASE("resuming from a checkpoint gives the losses of an uninterrupted run") {
  const Mode mode = GENERATE(Mode::kZeroOffload, Mode::kGpu);
  INFO(to_string(mode));
  EngineConfig config = base_config(mode);
  config.schedule = {LrSchedule::kLinear, 2, 12, 0.0};
  TempDir dir;

  std::vector<double> uninterrupted;
  {
    Engine engine = make_engine("tiny-llama", config);
    uninterrupted = losses_saving_at(engine, 12, 6, dir.file("ckpt"));
  }
  Engine resumed = make_engine("tiny-llama", config, /*seed=*/99);  // other weights, overwritten
  require_resumed_losses(resumed, dir.file("ckpt"), 6, uninterrupted);
}

TEST_CASE("a process killed while saving leaves the previous checkpoint loadable") {
  EngineConfig config = base_config(Mode::kZeroOffload);
  TempDir dir;
  const std::string checkpoint = dir.file("ckpt");
  Engine engine = make_engine("tiny-llama", config);
  auto loader = demo_loader(5);
  engine.train_step(loader->next());
  engine.save(checkpoint, R"({"marker": 1})");
  engine.train_step(loader->next());

  for (int delay_ms : {5, 20, 60}) {
    pid_t child = fork();
    REQUIRE(child >= 0);
    if (child == 0) {
      try {
        for (;;) engine.save(checkpoint, R"({"marker": 2})");
      } catch (...) {
        _exit(1);
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    kill(child, SIGKILL);
    waitpid(child, nullptr, 0);

    Engine reader = make_engine("tiny-llama", config);
    std::string extra = reader.load(checkpoint);
    INFO("after a kill at " << delay_ms << " ms: " << extra);
    CHECK((extra == R"({"marker":1})" || extra == R"({"marker":2})"));
    CHECK(reader.steps_taken() == (extra == R"({"marker":1})" ? 1 : 2));
  }
}

TEST_CASE("bad engine settings give clear errors") {
  EngineConfig config = base_config(Mode::kZeroOffload);
  config.grad_accumulation = 0;
  CHECK_THROWS_WITH(make_engine("tiny-llama", config), Catch::Contains("grad_accumulation = 0"));
  config = base_config(Mode::kZeroOffload);
  config.optimizer.lr = -1;
  CHECK_THROWS_WITH(make_engine("tiny-llama", config), Catch::Contains("lr = -1"));
  config = base_config(Mode::kZeroOffload);
  config.schedule.kind = LrSchedule::kCosine;
  CHECK_THROWS_WITH(make_engine("tiny-llama", config), Catch::Contains("total_steps"));
  CHECK_THROWS_WITH(parse_mode("fast"), Catch::Contains("gpu, zero-offload"));

  Engine engine = make_engine("tiny-llama", base_config(Mode::kZeroOffload));
  auto loader = demo_loader(1);
  torch::Tensor loss = engine.forward(loader->next());
  CHECK_THROWS_WITH(engine.forward(loader->next()), Catch::Contains("without backward()"));
  CHECK_THROWS_WITH(engine.step(), Catch::Contains("call backward() first"));
  engine.backward(loss);
  engine.step();
  CHECK_THROWS_WITH(engine.load("/nonexistent/ckpt"), Catch::Contains("does not exist"));
}

TEST_CASE("every entry point checks its batch against the model's vocabulary before any step") {
  for (const Mode mode : {Mode::kZeroOffload, Mode::kZo2}) {
    Engine engine = make_engine("tiny-llama", base_config(mode));
    REQUIRE(engine.vocab_size() == models::preset("tiny-llama").vocab_size);
    data::Batch batch = demo_loader(1)->next();
    batch.input_ids[2][5] = *engine.vocab_size();
    const std::string place = "input_ids[2, 5] is " + std::to_string(*engine.vocab_size());
    CHECK_THROWS_WITH(engine.train_step(batch), Catch::Contains(place) && Catch::Contains("valid token ids are 0"));
    CHECK_THROWS_WITH(engine.evaluate(batch), Catch::Contains(place));
    CHECK_THROWS_WITH(evaluate(engine, std::vector<data::Batch>{batch}), Catch::Contains(place));
    if (mode != Mode::kZo2) CHECK_THROWS_WITH(engine.forward(batch), Catch::Contains(place));
    CHECK_THROWS_WITH(engine.logits(batch.input_ids), Catch::Contains("tokens[2, 5]"));
    CHECK(engine.steps_taken() == 0);
  }
}

TEST_CASE("generation and evaluation run through the same parts") {
  Engine engine = make_engine("tiny-llama", base_config(Mode::kZeroOffload));
  auto loader = demo_loader(2);
  data::Batch batch = loader->next();
  double before = engine.evaluate(batch);
  for (int i = 0; i < 20; ++i) engine.train_step(batch);
  CHECK(engine.evaluate(batch) < before);
  std::vector<std::int64_t> out = engine.generate({256, 49, 43, 50, 61}, 4);
  CHECK(out.size() == 4);
  torch::Tensor logits = engine.logits(batch.input_ids);
  CHECK(logits.size(0) == batch.input_ids.size(0));
}

TEST_CASE("a batch's mask is dropped only when it pads nothing: the losses are the model's") {
  // Left padding (the first column): under causal attention right padding changes no loss.
  data::Batch full = demo_loader(2)->next();
  full.attention_mask = torch::ones_like(full.attention_mask);
  data::Batch padded = full;
  padded.attention_mask = full.attention_mask.clone();
  padded.attention_mask.select(1, 0).zero_();
  std::vector<double> losses;
  for (const data::Batch& batch : {padded, full}) {
    LayeredModel reference = models::build(models::preset("tiny-llama"), 7);
    torch::Tensor logits = reference.forward(batch.input_ids, batch.attention_mask);
    const double expected = reference.loss(logits, batch.labels).item<double>();
    Engine engine = make_engine("tiny-llama", base_config(Mode::kGpu));
    losses.push_back(engine.evaluate(batch));
    CHECK(losses.back() == Approx(expected).epsilon(1e-6));
  }
  CHECK(losses[0] != losses[1]);
}

TEST_CASE("on a CUDA device zero-offload follows the gpu mode") {
  if (ferry::testing::skip_without_cuda("the device equivalence runs on the GPU machine")) return;
  for (Precision precision : {Precision::kF32, Precision::kBF16, Precision::kF16}) {
    INFO(to_string(precision));
    EngineConfig config = base_config(Mode::kGpu);
    config.device = torch::kCUDA;
    config.precision = precision;
    config.grad_accumulation = 2;
    Run reference = train("tiny-llama", config, 30);
    config.mode = Mode::kZeroOffload;
    Run offloaded = train("tiny-llama", config, 30);
    // The forward and backward run on the same device in both modes; the update runs in torch
    // ops on the device (gpu mode) or in ferry's CPU kernels (zero-offload), with the same fp32
    // operations in the same order.
    // fp16 runs with dynamic loss scaling (its default): both modes must skip the same steps.
    const double tolerance = precision == Precision::kF32 ? 1e-5 : 1e-2;
    for (std::size_t i = 0; i < reference.steps.size(); ++i) {
      INFO("step " << i + 1);
      CHECK(offloaded.steps[i].loss == Approx(reference.steps[i].loss).epsilon(tolerance));
      CHECK(offloaded.steps[i].skipped == reference.steps[i].skipped);
    }
    CHECK(reference.steps.back().loss < reference.steps.front().loss);
  }
}

TEST_CASE("a traced run writes compute, gradient and optimizer spans and an overlap summary") {
  EngineConfig config = base_config(Mode::kZeroOffload);
  config.trace = true;
  Engine engine = make_engine("tiny-llama", config);
  auto loader = demo_loader(4);
  for (int i = 0; i < 3; ++i) engine.train_step(loader->next());
  TempDir dir;
  std::string summary = engine.write_trace(dir.file("trace.json"));
  CHECK_THAT(summary, Catch::Contains("CPU optimizer") && Catch::Contains("overlapped compute") &&
                          Catch::Contains("gpu -> host"));
  std::ifstream in(dir.file("trace.json"));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK_THAT(text, Catch::Contains("\"traceEvents\"") && Catch::Contains("backward block.1") &&
                       Catch::Contains("update block.0") && Catch::Contains("block.0 gradients") &&
                       Catch::Contains("host -> gpu"));

  Engine untraced = make_engine("tiny-llama", base_config(Mode::kZeroOffload));
  CHECK_THROWS_WITH(untraced.write_trace(dir.file("x.json")), Catch::Contains("trace = true"));
}
