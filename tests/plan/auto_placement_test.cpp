// Mode auto: the planner chooses every part's homes from the budgets and the hardware figures,
// and the engine runs the placement within those budgets.

#include <torch/cuda.h>
#include <torch/torch.h>

#include "ferry/engine.h"
#include "ferry/model.h"
#include "ferry/plan.h"
#include "ferry/system.h"
#include "support/skip.h"
#include "support/temp_dir.h"

// glog, which LibTorch includes, defines a CHECK macro of its own; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

using namespace ferry;
using Catch::Matchers::Contains;

namespace {

constexpr std::uint64_t kGiB = std::uint64_t{1} << 30;

Hardware machine() {
  Hardware hw;
  hw.name = "synthetic";
  hw.gpu_memory_bytes = 80 * kGiB;
  hw.gpu_memory_gbps = 2000;
  hw.matmul_tflops_bf16 = hw.matmul_tflops_fp16 = 400;
  hw.matmul_tflops_fp32 = 50;
  hw.pcie_h2d_gbps = hw.pcie_d2h_gbps = 25;
  hw.nvme = {{"/nvme", 3, 3}};
  hw.cpu_adam_params_per_s = 2e9;
  hw.host_memory_bytes = 256 * kGiB;
  return hw;
}

PlanRequest auto_request(const std::string& preset, const std::string& nvme) {
  PlanRequest request;
  request.model_name = preset;
  request.model = models::preset(preset);
  request.engine.mode = Mode::kAuto;
  request.engine.precision = Precision::kBF16;
  request.engine.nvme_directories = {nvme};
  request.batch = 4;
  request.seq = 512;
  request.attention = AttentionKernel::kFused;
  request.hardware = machine();
  request.hardware.nvme = {{nvme, 3, 3}};
  return request;
}

int rank(Tier tier) { return static_cast<int>(tier); }

// Every role's tier, part by part, and every block's checkpoint tier (a kept graph counts as
// faster than a checkpoint on the gpu).
std::vector<int> ranks(const Placement& placement) {
  std::vector<int> out;
  for (const PartPlacement& home : placement.parts) {
    for (Tier tier : {home.params, home.grads, home.master, home.states[0], home.states[1], home.accumulator}) {
      out.push_back(rank(tier));
    }
  }
  for (const BlockActivations& block : placement.activations) out.push_back(block.recompute ? 1 + rank(block.tier) : 0);
  return out;
}

std::uint64_t total(const Plan& plan, Tier tier) { return plan.tier_bytes[rank(tier)]; }

}  // namespace

TEST_CASE("auto: from everything on the gpu to only nvme left, each smaller budget moves roles to slower tiers") {
  testing::TempDir dir;
  PlanRequest request = auto_request("llama-1.3b", dir.path());
  const Plan roomy = make_plan(request);
  REQUIRE(roomy.fits);
  for (const PartPlacement& home : roomy.placement.parts) CHECK(home.updated_on_gpu());
  CHECK_THAT(roomy.placement_notes.front(), Contains("everything fits on the gpu"));

  std::vector<int> previous = ranks(roomy.placement);
  const std::uint64_t all_on_gpu = total(roomy, Tier::kGpu);
  std::vector<Plan> plans;
  // The gpu budget shrinks with the host unlimited, then the host budget with the gpu at its least.
  for (double share : {0.8, 0.6, 0.4, 0.25, 0.15}) {
    request.engine.gpu_budget_bytes = static_cast<std::uint64_t>(share * static_cast<double>(all_on_gpu));
    plans.push_back(make_plan(request));
  }
  // Roles move to NVMe until what stays in host memory, NVMe staging included, is the least the
  // engine can run with: then the plan names the host's shortfall.
  const std::uint64_t host_needed = total(plans.back(), Tier::kHost);
  std::size_t on_nvme = 0;
  for (double share = 0.9;; share -= 0.1) {
    request.engine.host_budget_bytes = static_cast<std::uint64_t>(share * static_cast<double>(host_needed));
    Plan plan = make_plan(request);
    if (!plan.fits) {
      CHECK_THAT(plan.shortfalls.front(), Contains("host tier: needs"));
      break;
    }
    plans.push_back(std::move(plan));
    ++on_nvme;
  }
  CHECK(on_nvme >= 2);
  for (const Plan& plan : plans) {
    INFO(format_plan(plan));
    REQUIRE(plan.fits);
    for (Tier tier : {Tier::kGpu, Tier::kHost, Tier::kNvme}) {
      if (plan.tier_budget[rank(tier)] > 0) CHECK(total(plan, tier) <= plan.tier_budget[rank(tier)]);
    }
    const std::vector<int> now = ranks(plan.placement);
    REQUIRE(now.size() == previous.size());
    for (std::size_t i = 0; i < now.size(); ++i) {
      INFO("role " << i);
      CHECK(now[i] >= previous[i]);
    }
    previous = now;
    // A slower placement for less memory, never a faster one.
    CHECK(plan.step_seconds >= roomy.step_seconds);
  }
  // The last plans keep the CPU's optimizer state on NVMe, and they are slower for it.
  const Plan& tightest = plans.back();
  CHECK(total(tightest, Tier::kNvme) > 0);
  CHECK(tightest.step_seconds > plans[plans.size() - 1 - on_nvme].step_seconds);

  request.engine.gpu_budget_bytes = 64 << 20;
  const Plan nothing = make_plan(request);
  CHECK_FALSE(nothing.fits);
  REQUIRE_FALSE(nothing.shortfalls.empty());
  CHECK_THAT(nothing.shortfalls.front(), Contains("gpu tier: needs"));
}

TEST_CASE("auto: while they hide under backward the cpu takes updates before any block is recomputed") {
  testing::TempDir dir;
  PlanRequest request = auto_request("llama-1.3b", dir.path());
  // A CPU that updates a block in far less time than the device takes for its backward.
  request.hardware.cpu_adam_params_per_s = 2e10;
  request.batch = 8;
  request.seq = 1024;
  const Plan roomy = make_plan(request);
  request.engine.gpu_budget_bytes = static_cast<std::uint64_t>(0.85 * static_cast<double>(total(roomy, Tier::kGpu)));
  const Plan plan = make_plan(request);
  REQUIRE(plan.fits);
  std::size_t cpu = 0, recomputed = 0;
  for (const PartPlacement& home : plan.placement.parts) cpu += !home.updated_on_gpu();
  for (const BlockActivations& block : plan.placement.activations) recomputed += block.recompute;
  CHECK(cpu > 0);
  CHECK(recomputed == 0);
  CHECK(plan.step_seconds <= 1.02 * roomy.step_seconds);
}

// The engine runs what auto planned, within the budgets it planned for: the store's peak on each
// tier, the gpu's share left for autograd included, is at most the budget.
TEST_CASE("auto: the engine runs the planned placement within every budget") {
  testing::TempDir dir;
  PlanRequest request = auto_request("tiny-llama", dir.subdir("nvme"));
  request.model.num_layers = 6;
  request.engine.precision = Precision::kF32;
  request.batch = 4;
  request.seq = 24;
  request.attention = default_attention_kernel();
  const Plan roomy = make_plan(request);
  request.engine.gpu_budget_bytes = total(roomy, Tier::kGpu) / 2;
  const Plan first = make_plan(request);
  // The most host memory that still sends some of the job to NVMe.
  Plan plan = first;
  for (double share = 0.95; share > 0.3 && total(plan, Tier::kNvme) == 0; share -= 0.05) {
    request.engine.host_budget_bytes = static_cast<std::uint64_t>(share * static_cast<double>(total(first, Tier::kHost)));
    plan = make_plan(request);
  }
  INFO(format_plan(plan));
  REQUIRE(plan.fits);
  CHECK(total(plan, Tier::kNvme) > 0);
  const EngineConfig config = plan_engine_config(plan);
  CHECK(config.mode == Mode::kAuto);
  CHECK(config.gpu_working_bytes > 0);

  Engine engine(models::build(request.model, 1), config);
  torch::Generator generator = at::detail::createCPUGenerator(3);
  for (int step = 0; step < 2; ++step) {
    data::Batch batch;
    batch.input_ids = torch::randint(request.model.vocab_size, {request.batch, request.seq}, generator, torch::kLong);
    batch.labels = batch.input_ids.clone();
    engine.train_step(batch);
  }
  const StoreStats store = engine.stats().store;
  for (Tier tier : {Tier::kGpu, Tier::kHost, Tier::kNvme}) {
    INFO(to_string(tier));
    const std::uint64_t budget = plan.tier_budget[rank(tier)];
    const std::uint64_t left_for_autograd = tier == Tier::kGpu ? config.gpu_working_bytes : 0;
    if (budget > 0) CHECK(store.tiers[rank(tier)].peak_bytes + left_for_autograd <= budget);
    CHECK(store.tiers[rank(tier)].peak_bytes + left_for_autograd == total(plan, tier));
  }
}

// Note: on a CUDA device the budget bounds what the caching allocator really holds: the store's
// bundles and pools within its share, kept graphs, working activations and autograd's buffers
// within gpu_working_bytes.
TEST_CASE("auto on a CUDA device: the allocator's peak stays within the gpu budget") {
  if (ferry::testing::skip_without_cuda("the allocator's peak is measured on the GPU machine")) return;
  PlanRequest request;
  request.model_name = "llama-1.3b, 6 blocks";
  request.model = models::truncated(models::preset("llama-1.3b"), 6);
  request.engine.mode = Mode::kAuto;
  request.engine.precision = Precision::kBF16;
  request.engine.device = torch::Device(torch::kCUDA, 0);
  request.batch = 4;
  request.seq = 1024;
  request.hardware = hardware_preset("h100");
  const Plan roomy = make_plan(request);
  request.engine.gpu_budget_bytes = total(roomy, Tier::kGpu) * 6 / 10;
  const Plan plan = make_plan(request);
  INFO(format_plan(plan));
  REQUIRE(plan.fits);
  release_cached_gpu_memory();
  reset_gpu_peak_memory();
  const std::uint64_t before = gpu_memory_stats().allocated_bytes;
  {
    Engine engine(models::build(request.model, 1), plan_engine_config(plan));
    for (int step = 0; step < 3; ++step) {
      engine.train_step(data::random_batch(request.batch, request.seq, request.model.vocab_size, step));
    }
    synchronize_gpu();
  }
  const std::uint64_t peak = gpu_memory_stats().peak_allocated_bytes - before;
  CHECK(peak <= request.engine.gpu_budget_bytes);
}
