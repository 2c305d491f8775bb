// Dropout in training: seeded masks that every placement draws alike, that recomputation in
// backward replays, and that zo2's two perturbed forwards share.

#include <torch/torch.h>

#include <map>

#include "ferry/data.h"
#include "ferry/engine.h"
#include "ferry/model.h"
#include "ferry/safetensors.h"
#include "support/temp_dir.h"

// glog, which LibTorch includes, defines a CHECK macro of its own; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

#include "engine/training.h"

using namespace ferry;
using namespace ferry::testing;

namespace {

struct Run {
  std::vector<StepResult> steps;
  std::map<std::string, std::vector<char>> saved;  // every tensor of the final checkpoint, as bytes
};

// The steps, and the checkpoint saved after them: the fp32 master and optimizer states, which
// every placement writes the same way wherever its parameters live.
Run train(const std::string& preset, const EngineConfig& config, int steps) {
  Engine engine(models::build(models::preset(preset), 7), config);
  auto loader = demo_loader(11);
  Run run;
  while (static_cast<int>(run.steps.size()) < steps) {
    if (auto result = engine.train_step(loader->next())) run.steps.push_back(*result);
  }
  TempDir dir;
  engine.save(dir.file("checkpoint"));
  safetensors::Checkpoint checkpoint(dir.file("checkpoint"));
  for (const std::string& name : checkpoint.names()) {
    std::vector<char> bytes(checkpoint.tensor(name).bytes());
    checkpoint.read_into(name, bytes.data(), bytes.size());
    run.saved[name] = std::move(bytes);
  }
  return run;
}

void require_identical(const Run& a, const Run& b) {
  require_same_steps(a.steps, b.steps);
  REQUIRE(a.saved.size() == b.saved.size());
  for (const auto& [name, bytes] : a.saved) {
    INFO(name);
    REQUIRE(b.saved.count(name) == 1);
    CHECK(bytes == b.saved.at(name));
  }
}

EngineConfig with_dropout(Mode mode, double rate) {
  EngineConfig config = base_config(mode);
  config.dropout.rate = rate;
  config.dropout.seed = 5;
  return config;
}

}  // namespace

TEST_CASE("dropout draws the same masks in every placement, and recomputation replays them") {
  const std::string preset = GENERATE("tiny-gpt2", "tiny-opt", "tiny-llama");
  INFO(preset);
  const Run reference = train(preset, with_dropout(Mode::kGpu, 0.2), 6);
  SECTION("zero-offload") { require_identical(reference, train(preset, with_dropout(Mode::kZeroOffload, 0.2), 6)); }
  SECTION("fuyou") {
    TempDir dir;
    EngineConfig config = with_dropout(Mode::kFuyou, 0.2);
    config.nvme_directories = {dir.subdir("nvme")};
    require_identical(reference, train(preset, config, 6));
  }
  SECTION("graphs kept instead of recomputed") {
    EngineConfig config = with_dropout(Mode::kGpu, 0.2);
    config.keep_graph_blocks = 2;
    require_identical(reference, train(preset, config, 6));
  }
  SECTION("micro-batches layer by layer") {
    // With a tied head the stem's gradient sums in another order (fuyou_test.cpp says so), so
    // the untied tiny-llama alone is bit-exact.
    if (preset == "tiny-llama") {
      EngineConfig batch_major = with_dropout(Mode::kZeroOffload, 0.2);
      batch_major.grad_accumulation = 2;
      EngineConfig layer_major = batch_major;
      layer_major.micro_batch_order = MicroBatchOrder::kLayerMajor;
      require_identical(train(preset, batch_major, 3), train(preset, layer_major, 3));
    }
  }
  SECTION("and it is on: without it, or with another seed, the losses differ") {
    const Run without = train(preset, with_dropout(Mode::kGpu, 0.0), 6);
    CHECK(without.steps[0].loss != reference.steps[0].loss);
    EngineConfig other_seed = with_dropout(Mode::kGpu, 0.2);
    other_seed.dropout.seed = 6;
    CHECK(train(preset, other_seed, 1).steps[0].loss != reference.steps[0].loss);
  }
}

TEST_CASE("zo2's +eps and -eps forwards of a step share their dropout masks") {
  // A perturbation far below an fp32 weight's precision: the two forwards compute the same
  // function, so their losses are equal exactly when their masks are.
  EngineConfig config = with_dropout(Mode::kZo2, 0.5);
  config.zo.eps = 1e-12;
  config.zo.block_tier = Tier::kGpu;
  const Run masked = train("tiny-gpt2", config, 3);
  EngineConfig other_seed = config;
  other_seed.dropout.seed = 6;
  const Run other = train("tiny-gpt2", other_seed, 1);
  CHECK(std::abs(other.steps[0].loss_plus[0] - masked.steps[0].loss_plus[0]) > 1e-4);
  for (const StepResult& step : masked.steps) CHECK(std::abs(step.loss_plus[0] - step.loss_minus[0]) < 1e-6);
}

TEST_CASE("a model's own rates apply unless the dropout setting overrides them, and inference draws none") {
  models::ModelConfig shape = models::preset("tiny-gpt2");
  shape.dropout = {0.1, 0.1, 0.1};
  LayeredModel model = models::build(shape, 3);
  const torch::Tensor tokens = torch::randint(0, shape.vocab_size, {2, 12}, torch::kLong);
  StepContext context = model.make_context(tokens);
  CHECK(context.dropout.rates.residual == 0.1);
  CHECK_FALSE(context.dropout.training);
  const torch::Tensor hidden = model.stem()->forward(tokens, context);
  CHECK(torch::equal(model.blocks()[0]->forward(hidden, context), model.blocks()[0]->forward(hidden, context)));

  context.dropout.training = true;
  context.dropout.step = 4;
  const torch::Tensor first = model.blocks()[0]->forward(hidden, context);
  CHECK(torch::equal(first, model.blocks()[0]->forward(hidden, context)));      // the same masks again
  context.dropout.step = 5;
  CHECK_FALSE(torch::equal(first, model.blocks()[0]->forward(hidden, context)));  // another step's

  model.set_dropout(0.0);
  StepContext off = model.make_context(tokens);
  off.dropout.training = true;
  StepContext inference = model.make_context(tokens);
  CHECK(torch::allclose(model.blocks()[0]->forward(hidden, off), model.blocks()[0]->forward(hidden, inference)));
  CHECK_THROWS_WITH(model.set_dropout(1.0), Catch::Contains("0 <= rate < 1"));
}

TEST_CASE("dropout zeroes about p of the elements and scales the rest by 1 / (1 - p)") {
  StepContext context;
  context.dropout.training = true;
  const torch::Tensor ones = torch::ones({200000});
  const torch::Tensor dropped = dropout(ones, 0.25, context, 1, 0);
  const double zeroed = dropped.eq(0).to(torch::kDouble).mean().item<double>();
  CHECK(zeroed == Approx(0.25).margin(0.01));
  CHECK(dropped.max().item<float>() == Approx(1.0 / 0.75));
  CHECK(torch::equal(dropout(ones, 0.25, context, 1, 1).eq(0), dropout(ones, 0.25, context, 1, 1).eq(0)));
  CHECK_FALSE(torch::equal(dropped.eq(0), dropout(ones, 0.25, context, 1, 1).eq(0)));  // another site
  CHECK_FALSE(torch::equal(dropped.eq(0), dropout(ones, 0.25, context, 2, 0).eq(0)));  // another part
}
