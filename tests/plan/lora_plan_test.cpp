// `ferry plan` for LoRA over a base streamed from host memory: each visit moves the bundles the
// engine's store moves, an fp8 base at a byte an element and a scale a channel. The engine, run on
// the CPU with the same placement, carries exactly the bytes the plan predicts.

#include <torch/torch.h>

#include "ferry/data.h"
#include "ferry/engine.h"
#include "ferry/model.h"
#include "ferry/plan.h"
#include "plan/cpu_figures.h"
#include "support/catch.h"

using namespace ferry;

namespace {

constexpr std::int64_t kBatch = 4;
constexpr std::int64_t kSeq = 32;

using testing::cpu_figures;

// Every block's base and adapters at home in host memory, the adapters updated by the CPU, every
// block recomputed from a checkpoint on the device; the stem and the head resident.
Placement base_on_host(std::int64_t blocks) {
  PartPlacement block;
  block.params = block.grads = block.master = block.states[0] = block.states[1] = block.accumulator = Tier::kHost;
  Placement placement;
  placement.parts.assign(static_cast<std::size_t>(blocks) + 2, block);
  placement.parts.front() = placement.parts.back() = PartPlacement{};
  placement.activations.assign(static_cast<std::size_t>(blocks), BlockActivations{true, Tier::kGpu});
  return placement;
}

std::uint64_t host_to_device_bytes(const Engine& engine) {
  return engine.stats().store.transfers[static_cast<int>(Tier::kHost)][static_cast<int>(Tier::kGpu)].bytes;
}

// A tiny LLaMA with rank-4 adapters on every target, its base stored as `storage`, in fp32.
PlanRequest lora_request(Mode mode, BaseStorage storage) {
  PlanRequest request;
  request.model = models::preset("tiny-llama");
  request.model.lora.rank = 4;
  request.engine.mode = mode;
  request.engine.precision = Precision::kF32;
  request.engine.base_storage = storage;
  request.batch = kBatch;
  request.seq = kSeq;
  request.hardware = cpu_figures();
  return request;
}

// The host-to-device bytes the plan predicts per step, checked against what the engine, run with
// the plan's settings, moves in its second step.
std::uint64_t planned_and_moved_up(const PlanRequest& request) {
  const Plan plan = make_plan(request);
  REQUIRE(plan.fits);
  const std::uint64_t planned = plan.moved_bytes[static_cast<int>(Resource::kPcieUp)];
  Engine engine(models::build(request.model, 1), plan_engine_config(plan));
  torch::Generator generator = at::detail::createCPUGenerator(3);
  data::Batch batch;
  batch.input_ids = torch::randint(request.model.vocab_size, {kBatch, kSeq}, generator, torch::kLong);
  batch.labels = batch.input_ids.clone();
  engine.train_step(batch);
  const std::uint64_t before = host_to_device_bytes(engine);
  engine.train_step(batch);
  CHECK(host_to_device_bytes(engine) - before == planned);
  return planned;
}

}  // namespace

TEST_CASE("plan: a LoRA base streamed from host moves what the engine moves, fp8 or in the compute dtype") {
  const BaseStorage storage = GENERATE(BaseStorage::kFp8, BaseStorage::kCompute);
  INFO("base storage " << to_string(storage));
  PlanRequest request = lora_request(Mode::kAuto, storage);
  request.engine.placement = base_on_host(request.model.num_layers);
  const std::uint64_t planned = planned_and_moved_up(request);

  // Each block visits twice a step (forward, and backward's recomputation); an fp8 base is about a
  // quarter of an fp32 one.
  const auto blocks = static_cast<std::uint64_t>(request.model.num_layers);
  const auto base = static_cast<std::uint64_t>(request.model.block_parameter_count());
  if (storage == BaseStorage::kFp8) {
    CHECK(planned < 2 * blocks * base * 4 / 2);
  } else {
    CHECK(planned >= 2 * blocks * base * 4);
  }
}

TEST_CASE("plan: zo2 with LoRA uploads each streamed block's base with its adapters, as the engine does") {
  auto zo2_request = [](BaseStorage storage) {
    PlanRequest request = lora_request(Mode::kZo2, storage);
    request.engine.optimizer.kind = OptimizerKind::kSgd;
    request.engine.optimizer.momentum = 0.9;
    request.engine.zo.block_tier = Tier::kHost;
    return request;
  };
  CHECK(planned_and_moved_up(zo2_request(BaseStorage::kFp8)) < planned_and_moved_up(zo2_request(BaseStorage::kCompute)));
}
