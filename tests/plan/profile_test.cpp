// Profiling: the compute and the CPU worker's rate measured on the real model, before the plan
// that runs the job.

#include <torch/torch.h>

#include "ferry/engine.h"
#include "ferry/model.h"
#include "ferry/plan.h"
#include "plan/cpu_figures.h"
#include "support/temp_dir.h"

// glog, which LibTorch includes, defines a CHECK macro of its own; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

using namespace ferry;
using Catch::Matchers::Contains;

namespace {

PlanRequest tiny_auto(const std::string& nvme) {
  PlanRequest request;
  request.model_name = "tiny-llama";
  request.model = models::preset("tiny-llama");
  request.model.num_layers = 4;
  request.engine.mode = Mode::kAuto;
  request.engine.precision = Precision::kF32;
  request.engine.nvme_directories = {nvme};
  request.batch = 2;
  request.seq = 16;
  request.hardware = testing::cpu_figures();
  request.hardware.nvme = {{nvme, 1, 1}};
  return request;
}

data::Batch random_batch(const PlanRequest& request) {
  torch::Generator generator = at::detail::createCPUGenerator(5);
  data::Batch batch;
  batch.input_ids = torch::randint(request.model.vocab_size, {request.batch, request.seq}, generator, torch::kLong);
  batch.labels = batch.input_ids.clone();
  return batch;
}

// "recompute from gpu", ... per block: readable when a check fails.
std::vector<std::string> described(const std::vector<BlockActivations>& blocks) {
  std::vector<std::string> out;
  for (const BlockActivations& block : blocks) out.push_back(block.describe());
  return out;
}

std::size_t cpu_updated(const Plan& plan) {
  std::size_t parts = 0;
  for (const PartPlacement& home : plan.placement.parts) parts += !home.updated_on_gpu();
  return parts;
}

}  // namespace

TEST_CASE("profiling recomputes every block where its checkpoint fits, and fuyou's from NVMe") {
  EngineConfig config;
  config.mode = Mode::kAuto;
  config.grad_accumulation = 4;
  config.micro_batch_order = MicroBatchOrder::kLayerMajor;
  config.placement.activations = {{false, Tier::kGpu}, {true, Tier::kHost}, {true, Tier::kNvme}};
  const EngineConfig profiled = profiling_config(config, 3);
  CHECK(described(profiled.placement.activations) ==
        std::vector<std::string>{"recompute from gpu", "recompute from host", "recompute from nvme"});
  CHECK(profiled.grad_accumulation == 1);
  CHECK(profiled.micro_batch_order == MicroBatchOrder::kBatchMajor);
  CHECK(profiled.trace);

  config.placement.activations.clear();
  config.offload_checkpoints = true;
  CHECK(described(profiling_config(config, 2).placement.activations) ==
        std::vector<std::string>(2, "recompute from host"));

  config.mode = Mode::kFuyou;
  config.fuyou.host_blocks = 2;
  const EngineConfig fuyou = profiling_config(config, 3);
  CHECK(described(fuyou.placement.activations) == std::vector<std::string>(3, "recompute from nvme"));
  CHECK(fuyou.fuyou.host_blocks == 0);
}

TEST_CASE("a profile of the first plan measures every part and the CPU worker's rate, and the plan runs on them") {
  testing::TempDir dir;
  PlanRequest request = tiny_auto(dir.subdir("nvme"));
  const Plan roomy = make_plan(request);
  REQUIRE(cpu_updated(roomy) == 0);
  request.engine.gpu_budget_bytes = roomy.tier_bytes[static_cast<int>(Tier::kGpu)] * 2 / 3;
  const Plan first = make_plan(request);
  INFO(format_plan(first));
  REQUIRE(first.fits);
  REQUIRE(cpu_updated(first) > 0);

  const data::Batch batch = random_batch(request);
  const MeasuredCompute measured = profile_compute(models::build(request.model, 1), plan_engine_config(first), batch);
  CHECK(measured.batch == request.batch);
  CHECK(measured.seq == request.seq);
  const std::size_t parts = static_cast<std::size_t>(request.model.num_layers) + 2;
  REQUIRE(measured.part_forward_seconds.size() == parts);
  REQUIRE(measured.part_backward_seconds.size() == parts);
  for (std::size_t part = 0; part < parts; ++part) {
    INFO("part " << part);
    CHECK(measured.part_forward_seconds[part] > 0);
    CHECK(measured.part_backward_seconds[part] > 0);
  }
  CHECK(measured.cpu_update_params_per_s > 0);

  request.measured = measured;
  const Plan profiled = make_plan(request);
  CHECK(profiled.fits);
  CHECK_THAT(format_plan(profiled), Contains("compute: measured at batch 2 x seq 16") &&
                                        Contains("CPU updates: measured in the step"));

  // Every part updated on the device: no CPU rate to measure, the calibrated one stays.
  const MeasuredCompute on_device = profile_compute(models::build(request.model, 1), plan_engine_config(roomy), batch);
  CHECK(on_device.cpu_update_params_per_s == 0);
}
