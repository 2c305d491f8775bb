// The plan against what the engine allocates, in every mode: the same bytes per tier (the engine
// sizes itself with engine_demand), and activations within a stated margin of what a forward holds.

#include <malloc.h>

#include <torch/torch.h>

#include "ferry/engine.h"
#include "ferry/model.h"
#include "ferry/plan.h"
#include "plan/costs.h"
#include "plan/cpu_figures.h"
#include "support/temp_dir.h"

// glog, which LibTorch includes, defines a CHECK macro of its own; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

using namespace ferry;

namespace {

constexpr std::int64_t kBatch = 4;
constexpr std::int64_t kSeq = 64;

using testing::cpu_figures;

PlanRequest tiny_request(const std::string& preset, Mode mode, std::int64_t keep_graph_blocks) {
  PlanRequest request;
  request.model = models::preset(preset);
  request.engine.mode = mode;
  request.engine.precision = Precision::kF32;
  request.engine.keep_graph_blocks = keep_graph_blocks;
  request.batch = kBatch;
  request.seq = kSeq;
  request.hardware = cpu_figures();
  return request;
}

// What the store does not hold: kept graphs and the working activations (autograd's own memory).
// Checkpoints are store bundles.
bool is_activation(const PlanItem& item) {
  for (const char* prefix : {"graphs", "working activations", "hidden states", "allocator headroom"}) {
    if (item.role.rfind(prefix, 0) == 0) return true;
  }
  return false;
}

data::Batch random_batch(std::int64_t vocab) {
  torch::Generator generator = at::detail::createCPUGenerator(3);
  data::Batch batch;
  batch.input_ids = torch::randint(vocab, {kBatch, kSeq}, generator, torch::kLong);
  batch.labels = batch.input_ids.clone();
  return batch;
}

std::uint64_t heap_bytes() {
  const struct mallinfo2 info = mallinfo2();
  return info.uordblks + info.hblkhd;
}

}  // namespace

TEST_CASE("plan: the bytes per tier are what the engine allocates (gpu, zero-offload)") {
  const std::string preset = GENERATE("tiny-llama", "tiny-gpt2", "tiny-opt");
  const Mode mode = GENERATE(Mode::kGpu, Mode::kZeroOffload);
  INFO(preset << " " << to_string(mode));
  const PlanRequest request = tiny_request(preset, mode, 0);
  const Plan plan = make_plan(request);

  Engine engine(models::build(request.model, 1), plan_engine_config(plan));
  engine.train_step(random_batch(request.model.vocab_size));
  const StoreStats store = engine.stats().store;
  for (Tier tier : {Tier::kGpu, Tier::kHost, Tier::kNvme}) {
    std::uint64_t planned = 0;
    for (const PlanItem& item : plan.items) {
      if (item.tier == tier && !is_activation(item)) planned += item.bytes;
    }
    INFO(to_string(tier));
    // The plan holds the most the engine may keep; the device gradients of zero-offload exist
    // only while their part's backward runs, so the store's peak may stay below it.
    CHECK(store.tiers[static_cast<int>(tier)].peak_bytes <= planned);
    CHECK(static_cast<double>(store.tiers[static_cast<int>(tier)].peak_bytes) >= 0.75 * static_cast<double>(planned));
  }
}

TEST_CASE("plan: a zo2 plan holds what the engine's store keeps, blocks on host or on NVMe") {
  const std::string preset = GENERATE("tiny-llama", "tiny-opt");
  const Tier home = GENERATE(Tier::kHost, Tier::kNvme);
  INFO(preset << ", blocks on " << to_string(home));
  testing::TempDir nvme;
  PlanRequest request = tiny_request(preset, Mode::kZo2, 0);
  request.engine.optimizer.kind = OptimizerKind::kSgd;
  request.engine.zo.block_tier = home;
  if (home == Tier::kNvme) {
    request.engine.nvme_directories = {nvme.path()};
    request.hardware.nvme.push_back({nvme.path(), 1.0, 1.0});
  }
  const Plan plan = make_plan(request);

  Engine engine(models::build(request.model, 1), plan_engine_config(plan));
  for (int step = 0; step < 2; ++step) engine.train_step(random_batch(request.model.vocab_size));
  const StoreStats store = engine.stats().store;
  for (Tier tier : {Tier::kGpu, Tier::kHost, Tier::kNvme}) {
    std::uint64_t planned = 0;
    for (const PlanItem& item : plan.items) {
      if (item.tier == tier && !is_activation(item)) planned += item.bytes;
    }
    INFO(to_string(tier) << ": planned " << planned << ", store peak " << store.tiers[static_cast<int>(tier)].peak_bytes);
    // The plan is zo2's set-up counted, its window and NVMe staging pools included.
    CHECK(store.tiers[static_cast<int>(tier)].peak_bytes == planned);
  }
}

// A fuyou plan's EngineConfig as it is: a host block, a block on NVMe, checkpoints on both.
TEST_CASE("plan: a fuyou plan runs in the engine within the bytes per tier it plans") {
  testing::TempDir nvme;
  PlanRequest request = tiny_request("tiny-llama", Mode::kFuyou, 0);
  request.engine.nvme_directories = {nvme.path()};
  request.hardware.nvme = {{nvme.path(), 1, 1}};
  request.choose_activations = false;
  request.choose_host_blocks = false;
  request.engine.fuyou.host_blocks = 1;
  request.engine.placement.activations = parse_activations("nvme,host", request.model.num_layers);
  request.engine.max_grad_norm = 1.0;
  const Plan plan = make_plan(request);
  REQUIRE(plan.fits);
  const EngineConfig config = plan_engine_config(plan);
  CHECK(config.fuyou.host_blocks == 1);

  Engine engine(models::build(request.model, 1), config);
  engine.train_step(random_batch(request.model.vocab_size));
  const StoreStats store = engine.stats().store;
  for (Tier tier : {Tier::kGpu, Tier::kHost, Tier::kNvme}) {
    INFO(to_string(tier));
    CHECK(store.tiers[static_cast<int>(tier)].peak_bytes <= plan.tier_bytes[static_cast<int>(tier)]);
  }
  CHECK(store.tiers[static_cast<int>(Tier::kNvme)].peak_bytes > 0);
}

// The layer-major order (GreedySnake): every micro-batch's checkpoints and the fp32 gradient sums
// on the device, as the plan sizes them, over two steps of two micro-batches each.
TEST_CASE("plan: a layer-major fuyou plan runs in the engine within the bytes per tier it plans") {
  testing::TempDir nvme;
  PlanRequest request = tiny_request("tiny-llama", Mode::kFuyou, 0);
  request.engine.nvme_directories = {nvme.path()};
  request.hardware.nvme = {{nvme.path(), 1, 1}};
  request.engine.grad_accumulation = 2;
  request.choose_micro_batch_order = false;
  request.engine.micro_batch_order = MicroBatchOrder::kLayerMajor;
  request.choose_activations = false;
  request.choose_host_blocks = false;
  request.engine.fuyou.host_blocks = 1;
  request.engine.placement.activations = parse_activations("nvme,host", request.model.num_layers);
  const Plan plan = make_plan(request);
  REQUIRE(plan.fits);
  const EngineConfig config = plan_engine_config(plan);
  CHECK(config.micro_batch_order == MicroBatchOrder::kLayerMajor);

  Engine engine(models::build(request.model, 1), config);
  int steps = 0;
  for (int micro = 0; micro < 4; ++micro) {
    if (engine.train_step(random_batch(request.model.vocab_size))) ++steps;
  }
  CHECK(steps == 2);
  const StoreStats store = engine.stats().store;
  for (Tier tier : {Tier::kGpu, Tier::kHost, Tier::kNvme}) {
    INFO(to_string(tier));
    CHECK(store.tiers[static_cast<int>(tier)].peak_bytes <= plan.tier_bytes[static_cast<int>(tier)]);
  }
}

// Note: the margin. The plan counts what autograd saves, tensor by tensor, from the families'
// code; a forward also holds the step's context (positions, masks, RoPE tables) and the
// allocator's rounding. 20% covers both on these tiny shapes.
TEST_CASE("plan: activations held after forward are within 20% of the plan") {
  const std::string preset = GENERATE("tiny-llama", "tiny-gpt2", "tiny-opt");
  const std::int64_t keep = GENERATE(0, 2);
  INFO(preset << ", blocks keeping their graph: " << keep);
  PlanRequest request = tiny_request(preset, Mode::kGpu, keep);
  request.attention = default_attention_kernel();  // what this build runs on the CPU
  const Plan plan = make_plan(request);
  std::uint64_t planned = 0;
  for (const PlanItem& item : plan.items) {
    if (item.role == "activation checkpoints" || item.role.rfind("graphs", 0) == 0) planned += item.bytes;
  }
  // The head keeps its norm's inputs and the loss its log-softmax until backward.
  planned += ferry::detail::head_costs(request.model, {kBatch, kSeq, 4, request.attention == AttentionKernel::kFused}).saved_bytes;

  Engine engine(models::build(request.model, 1), plan_engine_config(plan));
  const data::Batch batch = random_batch(request.model.vocab_size);
  engine.train_step(batch);  // first-touch allocations out of the way
  const std::uint64_t before = heap_bytes();
  torch::Tensor loss = engine.forward(batch);
  const std::uint64_t held = heap_bytes() - before;
  engine.backward(loss);
  engine.step();
  CHECK(static_cast<double>(held) == Approx(static_cast<double>(planned)).epsilon(0.20));
}
