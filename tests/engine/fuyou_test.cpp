// The fuyou mode against the gpu reference mode, with the same seeds and data: everything a part
// owns on NVMe (a real file in a temporary directory, real io_uring), blocks streamed through the
// host and the device, activation checkpoints swapped.

#include <cerrno>
#include <map>

#include <torch/torch.h>

#include "ferry/data.h"
#include "ferry/engine.h"
#include "ferry/testing/io_fault.h"
#include "ferry/model.h"
#include "ferry/safetensors.h"
#include "support/skip.h"
#include "support/temp_dir.h"

// glog, which LibTorch includes, defines a CHECK macro of its own; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

#include "engine/training.h"

using namespace ferry;
using namespace ferry::testing;

namespace {

models::ModelConfig model_config(const std::string& preset, std::int64_t layers = 0) {
  models::ModelConfig config = models::preset(preset);
  if (layers > 0) config.num_layers = layers;
  return config;
}

Engine make_engine(const models::ModelConfig& model, const EngineConfig& config, std::uint64_t seed = 7) {
  return Engine(models::build(model, seed), config);
}

EngineConfig fuyou_config(const EngineConfig& reference, const TempDir& dir) {
  EngineConfig config = reference;
  config.mode = Mode::kFuyou;
  config.nvme_directories = {dir.subdir("nvme")};
  return config;
}

struct Run {
  std::vector<StepResult> steps;
  std::map<std::string, std::vector<char>> saved;  // every tensor of the checkpoint, as bytes
  EngineStats stats;
};

std::map<std::string, std::vector<char>> read_checkpoint(const std::string& dir) {
  safetensors::Checkpoint checkpoint(dir);
  std::map<std::string, std::vector<char>> tensors;
  for (const std::string& name : checkpoint.names()) {
    std::vector<char>& bytes = tensors[name];
    bytes.resize(checkpoint.tensor(name).bytes());
    checkpoint.read_into(name, bytes.data(), bytes.size());
  }
  return tensors;
}

Run train(const models::ModelConfig& model, const EngineConfig& config, int steps, const TempDir& dir) {
  Engine engine = make_engine(model, config);
  auto loader = demo_loader(11);
  Run run;
  while (static_cast<int>(run.steps.size()) < steps) {
    if (auto result = engine.train_step(loader->next())) run.steps.push_back(*result);
  }
  const std::string saved = dir.file(std::string("saved-") + to_string(config.mode));
  engine.save(saved);
  run.saved = read_checkpoint(saved);
  run.stats = engine.stats();
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

std::vector<BlockActivations> checkpoints_on(const std::vector<Tier>& tiers) {
  std::vector<BlockActivations> blocks;
  for (Tier tier : tiers) blocks.push_back({true, tier});
  return blocks;
}

std::uint64_t moved(const EngineStats& stats, Tier from, Tier to) {
  return stats.store.transfers[static_cast<int>(from)][static_cast<int>(to)].bytes;
}

}  // namespace

TEST_CASE("fuyou equals the gpu mode exactly in fp32") {
  const std::string preset = GENERATE("tiny-llama", "tiny-gpt2");
  INFO(preset);
  const models::ModelConfig model = model_config(preset, 4);
  EngineConfig config = base_config(Mode::kGpu);
  TempDir dir;
  EngineConfig fuyou = fuyou_config(config, dir);
  SECTION("checkpoints on nvme, host and gpu") {
    fuyou.placement.activations = checkpoints_on({Tier::kNvme, Tier::kHost, Tier::kGpu, Tier::kNvme});
  }
  SECTION("with gradient accumulation, clipping and a schedule") {
    config.grad_accumulation = 2;
    config.max_grad_norm = 0.5;
    config.schedule = {LrSchedule::kCosine, 5, 30, 0.1};
    fuyou = fuyou_config(config, dir);
    fuyou.placement.activations = checkpoints_on({Tier::kNvme, Tier::kNvme, Tier::kNvme, Tier::kNvme});
  }
  SECTION("with host blocks, a window of two and sgd with momentum") {
    config.optimizer.kind = OptimizerKind::kSgd;
    config.optimizer.momentum = 0.9;
    config.optimizer.lr = 0.05;
    fuyou = fuyou_config(config, dir);
    fuyou.fuyou.host_blocks = 2;
    fuyou.fuyou.blocks_in_flight = 2;
  }
  Run reference = train(model, config, 30, dir);
  Run streamed = train(model, fuyou, 30, dir);
  require_identical(reference, streamed);
  CHECK(reference.steps.back().loss < reference.steps.front().loss);
  // What it moved: parameters and states came from NVMe and went back, gradients went down.
  CHECK(moved(streamed.stats, Tier::kNvme, Tier::kHost) > 0);
  CHECK(moved(streamed.stats, Tier::kHost, Tier::kNvme) > 0);
  CHECK(moved(streamed.stats, Tier::kGpu, Tier::kHost) > 0);
}

TEST_CASE("fuyou equals the gpu mode in bf16 with an fp32 master") {
  const models::ModelConfig model = model_config("tiny-llama", 3);
  EngineConfig config = base_config(Mode::kGpu);
  config.precision = Precision::kBF16;
  TempDir dir;
  EngineConfig fuyou = fuyou_config(config, dir);
  fuyou.placement.activations = checkpoints_on({Tier::kNvme, Tier::kHost, Tier::kNvme});
  // Both run the same CPU kernels over the same fp32 master here; on a CUDA device the
  // tolerance is stated in the device test below.
  require_identical(train(model, config, 20, dir), train(model, fuyou, 20, dir));
}

TEST_CASE("fuyou trains with a host budget smaller than the optimizer states") {
  const models::ModelConfig model = model_config("tiny-llama", 16);
  TempDir dir;
  EngineConfig config = fuyou_config(base_config(Mode::kGpu), dir);
  config.fuyou.blocks_in_flight = 2;
  config.placement.activations.assign(16, {true, Tier::kNvme});
  const TierDemand demand = engine_demand(part_shapes(model), config);
  // What the mode keeps on the host, plus the staging of a few swapped checkpoints.
  const std::uint64_t budget = demand.bytes[static_cast<int>(Tier::kHost)] + (256 << 10);
  config.host_budget_bytes = budget;
  std::uint64_t state_bytes = 0;
  for (const TierDemand::Item& item : demand.items[static_cast<int>(Tier::kNvme)]) {
    if (item.role == "optimizer states") state_bytes = item.bytes;
  }
  INFO("host budget " << budget << " bytes, optimizer states " << state_bytes << " bytes");
  REQUIRE(state_bytes > budget);

  Engine engine = make_engine(model, config);
  auto loader = demo_loader(3);
  std::vector<double> losses;
  for (int i = 0; i < 12; ++i) losses.push_back(engine.train_step(loader->next())->loss);
  CHECK(losses.back() < losses.front());
  const TierStats host = engine.stats().store.tiers[static_cast<int>(Tier::kHost)];
  INFO("peak host " << host.peak_bytes << " bytes");
  CHECK(host.peak_bytes <= budget);
  CHECK(host.peak_bytes > 0);
}

TEST_CASE("fuyou resumes from a checkpoint with the losses of an uninterrupted run") {
  const models::ModelConfig model = model_config("tiny-llama", 3);
  TempDir dir;
  EngineConfig config = fuyou_config(base_config(Mode::kGpu), dir);
  config.precision = Precision::kBF16;
  config.schedule = {LrSchedule::kLinear, 2, 12, 0.0};
  config.placement.activations = checkpoints_on({Tier::kNvme, Tier::kHost, Tier::kGpu});

  std::vector<double> uninterrupted;
  {
    Engine engine = make_engine(model, config);
    uninterrupted = losses_saving_at(engine, 12, 6, dir.file("ckpt"));
  }
  // The checkpoint is the same format in every first-order mode: resume it in zero-offload too.
  for (Mode mode : {Mode::kFuyou, Mode::kZeroOffload}) {
    INFO(to_string(mode));
    EngineConfig resume_config = config;
    resume_config.mode = mode;
    if (mode == Mode::kZeroOffload) resume_config.placement.activations.clear();
    Engine resumed = make_engine(model, resume_config, /*seed=*/99);  // other weights, overwritten
    require_resumed_losses(resumed, dir.file("ckpt"), 6, uninterrupted);
  }
}

TEST_CASE("an NVMe error in the middle of a step fails it clearly and leaves the last checkpoint intact") {
  const models::ModelConfig model = model_config("tiny-llama", 3);
  TempDir dir;
  FaultInjectingEnv env;
  EngineConfig config = fuyou_config(base_config(Mode::kGpu), dir);
  config.nvme_env = &env;
  const IoOp op = GENERATE(IoOp::kRead, IoOp::kWrite);
  INFO((op == IoOp::kRead ? "read" : "write"));

  std::vector<double> losses;
  {
    Engine engine = make_engine(model, config);
    auto loader = demo_loader(5);
    for (int i = 0; i < 3; ++i) losses.push_back(engine.train_step(loader->next())->loss);
    engine.save(dir.file("ckpt"), loader->state().to_json());
    env.fail(op, "ferry-store", 0, EIO);
    CHECK_THROWS_WITH(engine.train_step(loader->next()),
                      Catch::Contains("ferry-store") && Catch::Contains("Input/output error"));
    env.clear();
  }
  // The checkpoint from before the failure loads and goes on where it stopped.
  Engine resumed = make_engine(model, config, /*seed=*/99);
  auto loader = demo_loader(5);
  loader->restore(data::LoaderState::from_json(resumed.load(dir.file("ckpt"))));
  CHECK(resumed.steps_taken() == 3);
  CHECK(std::isfinite(resumed.train_step(loader->next())->loss));
}

TEST_CASE("fuyou refuses settings it cannot run, naming them") {
  const models::ModelConfig model = model_config("tiny-llama");
  TempDir dir;
  EngineConfig config = base_config(Mode::kFuyou);
  CHECK_THROWS_WITH(make_engine(model, config), Catch::Contains("--nvme"));
  config = fuyou_config(base_config(Mode::kGpu), dir);
  config.keep_graph_blocks = 1;
  CHECK_THROWS_WITH(make_engine(model, config), Catch::Contains("keep_graph_blocks = 1"));
  config.keep_graph_blocks = 0;
  config.placement.activations = {{false, Tier::kGpu}, {true, Tier::kNvme}};
  CHECK_THROWS_WITH(make_engine(model, config), Catch::Contains("activations 'graph' are invalid in fuyou"));
  config.placement.activations = checkpoints_on({Tier::kNvme});
  CHECK_THROWS_WITH(make_engine(model, config), Catch::Contains("activations name 1 blocks but the model has 2"));
  config.placement.activations.clear();
  config.fuyou.blocks_in_flight = 1;
  CHECK_THROWS_WITH(make_engine(model, config), Catch::Contains("blocks_in_flight = 1"));
  config.fuyou.blocks_in_flight = 3;
  config.host_budget_bytes = 64 << 10;
  CHECK_THROWS_WITH(make_engine(model, config),
                    Catch::Contains("fuyou mode needs") && Catch::Contains("NVMe staging"));
  CHECK_THROWS_WITH(parse_block_activations("disk"), Catch::Contains("use gpu, host or nvme"));
}

TEST_CASE("on a CUDA device fuyou follows the gpu mode") {
  if (ferry::testing::skip_without_cuda("the device equivalence runs on the GPU machine")) return;
  const models::ModelConfig model = model_config("tiny-llama", 4);
  TempDir dir;
  for (Precision precision : {Precision::kF32, Precision::kBF16}) {
    INFO(to_string(precision));
    EngineConfig config = base_config(Mode::kGpu);
    config.device = torch::kCUDA;
    config.precision = precision;
    config.grad_accumulation = 2;
    Run reference = train(model, config, 30, dir);
    CHECK(reference.steps.back().loss < reference.steps.front().loss);
    for (MicroBatchOrder order : {MicroBatchOrder::kBatchMajor, MicroBatchOrder::kLayerMajor}) {
      INFO(to_string(order));
      EngineConfig fuyou = fuyou_config(config, dir);
      fuyou.micro_batch_order = order;
      fuyou.placement.activations = checkpoints_on({Tier::kNvme, Tier::kHost, Tier::kGpu, Tier::kNvme});
      Run streamed = train(model, fuyou, 30, dir);
      // The forward and backward run on the same device in both modes; the update runs in torch
      // ops on the device (gpu mode) or in ferry's CPU kernels (fuyou).
      const double tolerance = precision == Precision::kF32 ? 1e-5 : 1e-2;
      for (std::size_t i = 0; i < reference.steps.size(); ++i) {
        INFO("step " << i + 1);
        CHECK(streamed.steps[i].loss == Approx(reference.steps[i].loss).epsilon(tolerance));
      }
    }
  }
}

TEST_CASE("the layer-major order equals the batch-major one and moves each block once per step") {
  // tiny-llama's head is not tied to its embedding: with a tied head the stem's gradient sum
  // adds the same terms in another order (all heads' shares first), which is not bit-exact.
  const models::ModelConfig model = model_config("tiny-llama", 4);
  EngineConfig config = base_config(Mode::kGpu);
  config.grad_accumulation = 4;
  config.max_grad_norm = 1.0;
  TempDir dir;
  const Run reference = train(model, config, 8, dir);

  EngineConfig layer_major = config;
  layer_major.micro_batch_order = MicroBatchOrder::kLayerMajor;
  for (Mode mode : {Mode::kGpu, Mode::kZeroOffload}) {
    INFO(to_string(mode));
    layer_major.mode = mode;
    require_identical(reference, train(model, layer_major, 8, dir));
  }

  EngineConfig fuyou = fuyou_config(config, dir);
  fuyou.placement.activations = checkpoints_on({Tier::kNvme, Tier::kHost, Tier::kGpu, Tier::kNvme});
  const Run batch_major = train(model, fuyou, 8, dir);
  fuyou.micro_batch_order = MicroBatchOrder::kLayerMajor;
  const Run snake = train(model, fuyou, 8, dir);
  require_identical(reference, batch_major);
  require_identical(reference, snake);
  // Batch-major streams the blocks' parameters once per micro-batch and sends the fp32 gradient
  // sums home between micro-batches; layer-major does neither.
  const std::uint64_t read_batch_major = moved(batch_major.stats, Tier::kNvme, Tier::kHost);
  const std::uint64_t read_layer_major = moved(snake.stats, Tier::kNvme, Tier::kHost);
  const std::uint64_t written_batch_major = moved(batch_major.stats, Tier::kHost, Tier::kNvme);
  const std::uint64_t written_layer_major = moved(snake.stats, Tier::kHost, Tier::kNvme);
  INFO("NVMe read: batch-major " << read_batch_major << " bytes, layer-major " << read_layer_major
       << "; written: " << written_batch_major << ", " << written_layer_major);
  // The optimizer's own traffic (once per step) and the swapped checkpoints (once per
  // micro-batch) are the same in both orders.
  CHECK(read_layer_major * 3 < read_batch_major * 2);
  CHECK(written_layer_major * 3 < written_batch_major * 2);

  Engine engine = make_engine(model, fuyou);
  auto loader = demo_loader(1);
  CHECK_THROWS_WITH(engine.forward(loader->next()), Catch::Contains("layer-major") && Catch::Contains("train_step"));
  fuyou.grad_accumulation = 1;
  CHECK_THROWS_WITH(make_engine(model, fuyou), Catch::Contains("needs grad_accumulation > 1"));
}

TEST_CASE("the layer-major order takes micro-batches of different sizes") {
  const models::ModelConfig model = model_config("tiny-llama", 2);
  TempDir dir;
  EngineConfig config = base_config(Mode::kGpu);
  config.grad_accumulation = 3;
  EngineConfig snake = fuyou_config(config, dir);
  snake.micro_batch_order = MicroBatchOrder::kLayerMajor;
  snake.placement.activations = checkpoints_on({Tier::kNvme, Tier::kHost});
  Engine reference = make_engine(model, config);
  Engine layer_major = make_engine(model, snake);
  for (int step = 0; step < 3; ++step) {
    std::optional<StepResult> expected, got;
    for (std::int64_t m = 0; m < 3; ++m) {
      // The largest micro-batch comes last, after the others' checkpoints were stored.
      const data::Batch batch = data::random_batch(1 + m, 16 + 8 * m, model.vocab_size, 10 * step + m);
      expected = reference.train_step(batch);
      got = layer_major.train_step(batch);
    }
    REQUIRE(expected);
    REQUIRE(got);
    CHECK(got->loss == expected->loss);
    CHECK(got->grad_norm == expected->grad_norm);
  }
}
