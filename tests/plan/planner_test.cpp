// The planner's behaviour on synthetic hardware, and its errors.

#include "ferry/check.h"
#include "ferry/plan.h"

// glog, which LibTorch includes, defines a CHECK macro of its own; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

using namespace ferry;
using Catch::Matchers::Contains;

namespace {

constexpr std::uint64_t kGiB = std::uint64_t{1} << 30;

Hardware synthetic(double nvme_gbps) {
  Hardware hw;
  hw.name = "synthetic";
  hw.gpu_memory_bytes = 24 * kGiB;
  hw.gpu_memory_gbps = 900;
  hw.matmul_tflops_bf16 = hw.matmul_tflops_fp16 = 165;
  hw.matmul_tflops_fp32 = 80;
  hw.pcie_h2d_gbps = hw.pcie_d2h_gbps = 64;
  hw.nvme = {{"/nvme", nvme_gbps, nvme_gbps}};
  hw.cpu_adam_params_per_s = 3e9;
  hw.host_memory_bytes = 256 * kGiB;
  return hw;
}

PlanRequest fuyou_request(double nvme_gbps) {
  PlanRequest request;
  request.model_name = "llama-1.3b";
  request.model = models::preset("llama-1.3b");
  request.mode = PlanMode::kFuyou;
  request.engine.precision = Precision::kBF16;
  request.engine.nvme_directories = {"/nvme"};
  request.engine.gpu_budget_bytes = 10 * kGiB;
  request.engine.host_budget_bytes = 4 * kGiB;
  request.batch = 8;
  request.seq = 1024;
  request.attention = AttentionKernel::kFused;
  request.hardware = synthetic(nvme_gbps);
  return request;
}

std::int64_t count(const Plan& plan, bool recompute) {
  std::int64_t n = 0;
  for (const BlockActivations& block : plan.activations) n += block.recompute == recompute ? 1 : 0;
  return n;
}

std::int64_t on_tier(const Plan& plan, Tier tier) {
  std::int64_t n = 0;
  for (const BlockActivations& block : plan.activations) n += block.tier == tier ? 1 : 0;
  return n;
}

}  // namespace

TEST_CASE("planner: fast NVMe swaps more activations, slow NVMe recomputes more") {
  const Plan fast = make_plan(fuyou_request(200));
  const Plan slow = make_plan(fuyou_request(1));
  REQUIRE(fast.fits);
  REQUIRE(slow.fits);
  CHECK(count(fast, /*recompute=*/true) < count(slow, /*recompute=*/true));
  CHECK(count(slow, /*recompute=*/false) == 0);
  // The host budget is small: the fast plan's swapped graphs go on to NVMe.
  CHECK(on_tier(fast, Tier::kNvme) > 0);
  CHECK(on_tier(slow, Tier::kNvme) == 0);
  CHECK(fast.step_seconds < slow.step_seconds);
  CHECK((slow.bottleneck == Resource::kNvmeRead || slow.bottleneck == Resource::kNvmeWrite));
}

TEST_CASE("planner: the step is as long as its busiest resource at least, and moves what the mode moves") {
  PlanRequest request = fuyou_request(8);
  const Plan plan = make_plan(request);
  for (int r = 0; r < kResourceCount; ++r) CHECK(plan.busy_seconds[r] <= plan.step_seconds * (1 + 1e-9));
  // Every step writes every part's master, m, v and bf16 parameters back: 14 bytes a parameter.
  const double parameters = static_cast<double>(request.model.parameter_count());
  CHECK(static_cast<double>(plan.moved_bytes[static_cast<int>(Resource::kNvmeWrite)]) >= 14 * parameters);
  CHECK(plan.tokens_per_s == Approx(8 * 1024 / plan.step_seconds));
  CHECK(plan.model_tflops == Approx(6 * parameters * 8 * 1024 / plan.step_seconds / 1e12));
}

TEST_CASE("planner: zero-offload hides the CPU optimizer behind backward until it is the bottleneck") {
  PlanRequest request = fuyou_request(8);
  request.mode = PlanMode::kZeroOffload;
  request.engine.nvme_directories.clear();
  request.engine.gpu_budget_bytes = 0;
  request.engine.host_budget_bytes = 0;
  request.hardware.cpu_adam_params_per_s = 1e12;
  const Plan fast_cpu = make_plan(request);
  CHECK(fast_cpu.bottleneck == Resource::kCompute);
  request.hardware.cpu_adam_params_per_s = 1e8;
  const Plan slow_cpu = make_plan(request);
  CHECK(slow_cpu.bottleneck == Resource::kCpuOptimizer);
  CHECK(slow_cpu.step_seconds >= static_cast<double>(request.model.parameter_count()) / 1e8);
}

TEST_CASE("planner: a job that does not fit names the shortfall and the changes that fit") {
  PlanRequest request = fuyou_request(8);
  request.mode = PlanMode::kGpu;
  request.model = models::preset("llama-7b");
  request.engine.gpu_budget_bytes = 24 * kGiB;
  request.engine.host_budget_bytes = 0;
  const Plan plan = make_plan(request);
  CHECK_FALSE(plan.fits);
  REQUIRE(plan.shortfalls.size() == 1);
  CHECK_THAT(plan.shortfalls[0], Contains("gpu tier: needs") && Contains("short"));
  std::string fixes;
  for (const std::string& fix : plan.fixes) fixes += fix + "\n";
  CHECK_THAT(fixes, Contains("--mode zero-offload") && Contains("--mode fuyou"));
  CHECK_THAT(format_plan(plan), Contains("DOES NOT FIT"));

  // Over the host budget in zero-offload: raising it, or fuyou with the states on NVMe.
  request.mode = PlanMode::kZeroOffload;
  request.engine.host_budget_bytes = 32 * kGiB;
  const Plan host_short = make_plan(request);
  CHECK_FALSE(host_short.fits);
  fixes.clear();
  for (const std::string& fix : host_short.fixes) fixes += fix + "\n";
  CHECK_THAT(fixes, Contains("raise --host-budget to") && Contains("--mode fuyou"));
}

TEST_CASE("planner: bad input fails with the reason and the fix") {
  CHECK_THROWS_WITH(models::preset("gpt3-14b"), Contains("unknown model preset 'gpt3-14b'") && Contains("gpt3-13b"));
  CHECK_THROWS_WITH(hardware_preset("a100"), Contains("unknown hardware preset 'a100'") && Contains("rtx4090-fuyou"));
  CHECK_THROWS_WITH(parse_plan_mode("infinity"), Contains("valid: gpu, zero-offload, zo2, fuyou"));

  PlanRequest request = fuyou_request(8);
  request.engine.nvme_directories.clear();
  CHECK_THROWS_WITH(make_plan(request), Contains("--nvme DIR"));

  request = fuyou_request(8);
  request.hardware.nvme.clear();
  CHECK_THROWS_WITH(make_plan(request), Contains("no NVMe read bandwidth") && Contains("ferry bench calibrate"));

  request = fuyou_request(8);
  request.batch = 0;
  CHECK_THROWS_WITH(make_plan(request), Contains("batch = 0"));

  request = fuyou_request(8);
  request.model = models::preset("gpt2");
  request.seq = 4096;
  CHECK_THROWS_WITH(make_plan(request), Contains("1024 learned positions"));

  CHECK_THROWS_WITH(Hardware::load("/nonexistent/calibration.json"), Contains("ferry bench calibrate --out"));
  CHECK_THROWS_WITH(Hardware::from_json("{\"gpu_memory_bytes\": -1}", "cal.json"),
                    Contains("cal.json") && Contains("gpu_memory_bytes"));
}

TEST_CASE("planner: a calibration file round-trips") {
  const Hardware hw = hardware_preset("rtx4090-fuyou");
  const Hardware back = Hardware::from_json(hw.to_json(), "test");
  CHECK(back.to_json() == hw.to_json());
  CHECK(back.nvme_read_gbps({"raid0"}) == 30);
  // A directory without figures of its own counts as the mean of the known ones.
  CHECK(back.nvme_read_gbps({"raid0", "other"}) == 60);
}
