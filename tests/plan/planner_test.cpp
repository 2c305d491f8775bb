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
  request.engine.mode = Mode::kFuyou;
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

// llama-1.3b in zero-offload without budgets.
PlanRequest zero_offload_request() {
  PlanRequest request = fuyou_request(8);
  request.engine.mode = Mode::kZeroOffload;
  request.engine.nvme_directories.clear();
  request.engine.gpu_budget_bytes = 0;
  request.engine.host_budget_bytes = 0;
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

TEST_CASE("planner: fuyou puts more checkpoints on NVMe when NVMe is fast") {
  const Plan fast = make_plan(fuyou_request(200));
  const Plan slow = make_plan(fuyou_request(1));
  REQUIRE(fast.fits);
  REQUIRE(slow.fits);
  // Every block recomputes from its checkpoint, as the engine runs fuyou.
  CHECK(count(fast, /*recompute=*/false) == 0);
  CHECK(count(slow, /*recompute=*/false) == 0);
  // Slow NVMe: the device has room for every checkpoint, and each one there saves NVMe time.
  CHECK(on_tier(slow, Tier::kGpu) == slow.request.model.num_layers);
  // Fast NVMe hides the swaps: the device keeps fewer, leaving headroom.
  CHECK(on_tier(fast, Tier::kNvme) > 0);
  CHECK(fast.step_seconds < slow.step_seconds);
  CHECK((slow.bottleneck == Resource::kNvmeRead || slow.bottleneck == Resource::kNvmeWrite));
}

TEST_CASE("planner: with slow NVMe, fuyou keeps the checkpoints the device cannot hold in host memory") {
  PlanRequest request = fuyou_request(1);
  request.choose_host_blocks = false;  // host memory is for checkpoints only
  const Plan roomy = make_plan(request);
  REQUIRE(on_tier(roomy, Tier::kGpu) == request.model.num_layers);
  // Eight checkpoints too many for the device. Swapped checkpoints come back through a pool of
  // as many as the window holds (3), so 11 go to the host, which has room for just those.
  const std::uint64_t checkpoint = (roomy.checkpoint_bytes + 4095) / 4096 * 4096;
  request.engine.gpu_budget_bytes = roomy.tier_bytes[static_cast<int>(Tier::kGpu)] - 8 * checkpoint;
  request.engine.host_budget_bytes = roomy.tier_bytes[static_cast<int>(Tier::kHost)] + 11 * checkpoint;
  const Plan tight = make_plan(request);
  REQUIRE(tight.fits);
  CHECK(on_tier(tight, Tier::kNvme) == 0);
  CHECK(on_tier(tight, Tier::kHost) == 11);
  CHECK(tight.host_blocks == 0);
  for (Tier tier : {Tier::kGpu, Tier::kHost}) {
    CHECK(tight.tier_bytes[static_cast<int>(tier)] <= tight.tier_budget[static_cast<int>(tier)]);
  }
  // Fast NVMe moves them there instead.
  request.hardware = synthetic(200);
  CHECK(on_tier(make_plan(request), Tier::kNvme) > 0);
}

TEST_CASE("planner: the step is as long as its busiest resource at least, and moves what the mode moves") {
  PlanRequest request = fuyou_request(8);
  const Plan plan = make_plan(request);
  for (int r = 0; r < kResourceCount; ++r) CHECK(plan.busy_seconds[r] <= plan.step_seconds * (1 + 1e-9));
  // Every step writes every part's master, m and v back (12 bytes a parameter), and the bf16
  // parameters of the blocks on NVMe.
  const double parameters = static_cast<double>(request.model.parameter_count());
  const double nvme_block_parameters =
      static_cast<double>((request.model.num_layers - plan.host_blocks) * request.model.block_parameter_count());
  CHECK(static_cast<double>(plan.moved_bytes[static_cast<int>(Resource::kNvmeWrite)]) >=
        12 * parameters + 2 * nvme_block_parameters);
  CHECK(plan.tokens_per_s == Approx(8 * 1024 / plan.step_seconds));
  CHECK(plan.model_tflops == Approx(6 * parameters * 8 * 1024 / plan.step_seconds / 1e12));
}

TEST_CASE("planner: zero-offload hides the CPU optimizer behind backward until it is the bottleneck") {
  PlanRequest request = zero_offload_request();
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
  request.engine.mode = Mode::kGpu;
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
  request.engine.mode = Mode::kZeroOffload;
  request.engine.host_budget_bytes = 32 * kGiB;
  const Plan host_short = make_plan(request);
  CHECK_FALSE(host_short.fits);
  fixes.clear();
  for (const std::string& fix : host_short.fixes) fixes += fix + "\n";
  CHECK_THAT(fixes, Contains("raise the budgets: --host-budget ") && Contains("--mode fuyou"));

  // Each fix was planned with its change: the raised budget, applied, fits.
  const std::string& raise = host_short.fixes.front();
  REQUIRE_THAT(raise, Contains("raise the budgets: --host-budget "));
  const std::size_t size_begin = raise.find("--host-budget ") + std::string("--host-budget ").size();
  request.engine.host_budget_bytes = parse_bytes(raise.substr(size_begin, raise.find(' ', size_begin) - size_begin));
  CHECK(make_plan(request).fits);
}

TEST_CASE("planner: bad input fails with the reason and the fix") {
  CHECK_THROWS_WITH(models::preset("gpt3-14b"), Contains("unknown model preset 'gpt3-14b'") && Contains("gpt3-13b"));
  CHECK_THROWS_WITH(hardware_preset("a100"), Contains("unknown hardware preset 'a100'") && Contains("rtx4090-fuyou"));
  CHECK_THROWS_WITH(parse_mode("infinity"), Contains("valid modes are gpu, zero-offload, fuyou, auto, zo2"));
  CHECK(parse_activations("nvme", 3).size() == 3);
  CHECK_THROWS_WITH(parse_activations("gpu,nvme", 3), Contains("name 2 blocks but the model has 3"));
  CHECK_THROWS_WITH(parse_activations("gpu,disk,nvme", 3), Contains("disk"));

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

TEST_CASE("planner: the batch chooser takes the fastest batch that fits, a larger one with more memory") {
  PlanRequest request = fuyou_request(8);
  request.max_batch = 64;
  request.engine.gpu_budget_bytes = 4 * kGiB;
  const Plan small = make_plan(request);
  request.engine.gpu_budget_bytes = 20 * kGiB;
  const Plan large = make_plan(request);
  REQUIRE(small.fits);
  REQUIRE(large.fits);
  CHECK(large.request.batch > small.request.batch);
  for (const Plan* plan : {&small, &large}) {
    for (int t = 0; t < kTierCount; ++t) {
      if (plan->tier_budget[t] > 0) CHECK(plan->tier_bytes[t] <= plan->tier_budget[t]);
    }
  }
  // No power of two up to the limit that fits is faster.
  for (std::int64_t batch = 1; batch <= 64; batch *= 2) {
    PlanRequest fixed = request;
    fixed.max_batch = 0;
    fixed.batch = batch;
    const Plan plan = make_plan(fixed);
    INFO("batch " << batch);
    if (plan.fits) CHECK(plan.tokens_per_s <= large.tokens_per_s * (1 + 1e-9));
    if (batch > large.request.batch) CHECK_FALSE(plan.fits);
  }
  request.max_batch = -1;
  CHECK_THROWS_WITH(make_plan(request), Contains("max_batch = -1"));
}

TEST_CASE("planner: the EngineConfig a fuyou plan implies is one the engine accepts, within its budgets") {
  const Plan plan = make_plan(fuyou_request(8));
  REQUIRE(plan.fits);
  const EngineConfig config = plan_engine_config(plan);
  CHECK(config.mode == Mode::kFuyou);
  CHECK(plan.host_blocks > 0);
  CHECK(config.fuyou.host_blocks == plan.host_blocks);
  REQUIRE(static_cast<std::int64_t>(config.placement.activations.size()) == plan.request.model.num_layers);
  const TierDemand demand = engine_demand(part_shapes(plan.request.model), config);
  for (int t = 0; t < kTierCount; ++t) {
    INFO(to_string(static_cast<Tier>(t)));
    CHECK(demand.bytes[t] <= plan.tier_bytes[t]);  // the plan adds the activations
    if (plan.tier_budget[t] > 0) CHECK(demand.bytes[t] <= plan.tier_budget[t]);
  }
  CHECK_THAT(demand.describe(Tier::kHost), Contains("parameters"));
}

namespace {

MeasuredCompute uniform_times(std::int64_t blocks, std::int64_t batch, double block_forward_s,
                              double block_backward_s) {
  MeasuredCompute measured;
  measured.batch = batch;
  measured.seq = 1024;
  measured.part_forward_seconds.assign(static_cast<std::size_t>(blocks) + 2, block_forward_s);
  measured.part_backward_seconds.assign(static_cast<std::size_t>(blocks) + 2, block_backward_s);
  measured.part_forward_seconds.front() = measured.part_backward_seconds.front() = 0.001;  // the stem
  measured.part_forward_seconds.back() = 0.05;                                                // the head
  measured.part_backward_seconds.back() = 0.1;
  return measured;
}

double compute_busy(const Plan& plan) { return plan.busy_seconds[static_cast<int>(Resource::kCompute)]; }

}  // namespace

TEST_CASE("planner: measured block times replace the compute estimates, scaled by tokens") {
  PlanRequest request = fuyou_request(200);  // fast NVMe: the step is compute-bound
  request.choose_activations = false;       // every checkpoint on the device
  const std::int64_t blocks = request.model.num_layers;
  request.measured = uniform_times(blocks, 4, 0.1, 0.3);
  const Plan measured = make_plan(request);
  // Measured at batch 4, planned at 8: twice the measured seconds, recomputation included.
  const double expected = 2 * (0.001 + 0.001 + static_cast<double>(blocks) * (0.1 + 0.3) + 0.05 + 0.1);
  CHECK(compute_busy(measured) == Approx(expected));
  CHECK(measured.bottleneck == Resource::kCompute);
  CHECK(measured.step_seconds == Approx(expected).epsilon(0.05));
  CHECK(measured.step_seconds != Approx(make_plan(fuyou_request(200)).step_seconds).epsilon(0.05));

  // Blocks twice as slow add their time to the step.
  request.measured = uniform_times(blocks, 4, 0.2, 0.6);
  const Plan slower = make_plan(request);
  CHECK(slower.step_seconds - measured.step_seconds == Approx(2 * static_cast<double>(blocks) * 0.4).epsilon(0.05));

  // Measured at the planned batch, the same step.
  MeasuredCompute at_eight = uniform_times(blocks, 8, 0.2, 0.6);
  at_eight.part_forward_seconds.front() = at_eight.part_backward_seconds.front() = 0.002;
  at_eight.part_forward_seconds.back() = 0.1;
  at_eight.part_backward_seconds.back() = 0.2;
  request.measured = at_eight;
  CHECK(make_plan(request).step_seconds == Approx(measured.step_seconds));

  request.measured->part_backward_seconds[3] = -1;
  CHECK_THROWS_WITH(make_plan(request), Contains("measured compute of part 3 is -1 s"));
  request.measured->part_forward_seconds.pop_back();
  CHECK_THROWS_WITH(make_plan(request), Contains("the model has 26 parts"));
}

TEST_CASE("planner: a CPU update rate measured in the step replaces the calibrated one") {
  PlanRequest request = zero_offload_request();
  request.measured = uniform_times(request.model.num_layers, request.batch, 0.01, 0.03);
  auto cpu_busy = [&] { return make_plan(request).busy_seconds[static_cast<int>(Resource::kCpuOptimizer)]; };
  const double calibrated = cpu_busy();
  CHECK(calibrated == Approx(static_cast<double>(request.model.parameter_count()) /
                             request.hardware.cpu_adam_params_per_s));
  request.measured->cpu_update_params_per_s = request.hardware.cpu_adam_params_per_s / 2;
  CHECK(cpu_busy() == Approx(2 * calibrated));
  CHECK_THAT(format_plan(make_plan(request)), Contains("CPU updates: measured in the step, 1.50e9 parameters/s"));
  request.measured->cpu_update_params_per_s = -1;
  CHECK_THROWS_WITH(make_plan(request), Contains("measured CPU update rate -1 parameters/s is invalid"));
}

namespace {

std::uint64_t nvme_moved(const Plan& plan) {
  return plan.moved_bytes[static_cast<int>(Resource::kNvmeRead)] +
         plan.moved_bytes[static_cast<int>(Resource::kNvmeWrite)];
}

PlanRequest in_order(PlanRequest request, MicroBatchOrder order) {
  request.choose_micro_batch_order = false;
  request.engine.micro_batch_order = order;
  return request;
}

}  // namespace

TEST_CASE("planner: NVMe-bound fuyou with 8 micro-batches runs layer-major, streaming each block once") {
  PlanRequest request = fuyou_request(1);
  request.engine.grad_accumulation = 8;
  request.engine.host_budget_bytes = 8 * kGiB;  // the optimizer stages the gradient sums too
  const Plan chosen = make_plan(request);
  const Plan batch_major = make_plan(in_order(request, MicroBatchOrder::kBatchMajor));
  const Plan layer_major = make_plan(in_order(request, MicroBatchOrder::kLayerMajor));
  REQUIRE(chosen.fits);
  REQUIRE(batch_major.fits);
  REQUIRE(layer_major.fits);
  CHECK(chosen.micro_batch_order == MicroBatchOrder::kLayerMajor);
  CHECK(chosen.step_seconds == Approx(layer_major.step_seconds));
  CHECK(batch_major.micro_batch_order == MicroBatchOrder::kBatchMajor);
  CHECK((batch_major.bottleneck == Resource::kNvmeRead || batch_major.bottleneck == Resource::kNvmeWrite));
  // Batch-major reads every block on NVMe twice per micro-batch and keeps the gradient sums on
  // NVMe between micro-batches; layer-major reads each block twice per step.
  CHECK(nvme_moved(layer_major) * 3 < nvme_moved(batch_major));
  CHECK(layer_major.step_seconds < batch_major.step_seconds);
  CHECK_THAT(format_plan(chosen), Contains("micro-batch order: layer-major (chosen)"));
  CHECK_THAT(plan_to_json(chosen), Contains("\"micro_batch_order\": \"layer-major\""));

  const EngineConfig config = plan_engine_config(chosen);
  CHECK(config.micro_batch_order == MicroBatchOrder::kLayerMajor);
  const TierDemand demand = engine_demand(part_shapes(chosen.request.model), config);
  for (int t = 0; t < kTierCount; ++t) {
    INFO(to_string(static_cast<Tier>(t)));
    CHECK(demand.bytes[t] <= chosen.tier_bytes[t]);
    if (chosen.tier_budget[t] > 0) CHECK(chosen.tier_bytes[t] <= chosen.tier_budget[t]);
  }
}

TEST_CASE("planner: layer-major keeps every micro-batch's checkpoints, off the device when it is small") {
  PlanRequest request = fuyou_request(1);
  request.engine.grad_accumulation = 8;
  request.engine.host_budget_bytes = 64 * kGiB;
  const Plan roomy = make_plan(in_order(request, MicroBatchOrder::kBatchMajor));
  REQUIRE(on_tier(roomy, Tier::kGpu) == request.model.num_layers);
  // Room for every checkpoint of one micro-batch on the device and for layer-major's gradient
  // sums, not for the other 7 micro-batches' checkpoints.
  const std::uint64_t headroom = kGiB;
  request.engine.gpu_budget_bytes = roomy.tier_bytes[static_cast<int>(Tier::kGpu)] + headroom;
  REQUIRE(7 * static_cast<std::uint64_t>(request.model.num_layers) * roomy.checkpoint_bytes > headroom);
  const Plan plan = make_plan(request);
  REQUIRE(plan.fits);
  CHECK(plan.tier_bytes[static_cast<int>(Tier::kGpu)] <= plan.tier_budget[static_cast<int>(Tier::kGpu)]);
  if (plan.micro_batch_order == MicroBatchOrder::kLayerMajor) {
    const auto on_gpu = static_cast<std::uint64_t>(on_tier(plan, Tier::kGpu));
    CHECK(on_gpu < static_cast<std::uint64_t>(request.model.num_layers));
    CHECK(on_gpu * 8 * plan.checkpoint_bytes < plan.tier_budget[static_cast<int>(Tier::kGpu)]);
  }
  // Fixed to layer-major, the plan still fits, with the checkpoints in host memory or on NVMe.
  const Plan layer_major = make_plan(in_order(request, MicroBatchOrder::kLayerMajor));
  REQUIRE(layer_major.fits);
  CHECK(on_tier(layer_major, Tier::kHost) + on_tier(layer_major, Tier::kNvme) > 0);
}

TEST_CASE("planner: the micro-batch order is chosen only with accumulation, and a given one is kept") {
  PlanRequest request = fuyou_request(8);
  const Plan single = make_plan(request);
  CHECK(single.micro_batch_order == MicroBatchOrder::kBatchMajor);
  CHECK_THAT(format_plan(single), !Contains("micro-batch order"));
  request.engine.grad_accumulation = 4;
  const Plan given = make_plan(in_order(request, MicroBatchOrder::kLayerMajor));
  CHECK(given.micro_batch_order == MicroBatchOrder::kLayerMajor);
  CHECK_THAT(format_plan(given), Contains("micro-batch order: layer-major (given)"));
  // In gpu mode nothing streams: the orders take the same time and batch-major holds less.
  PlanRequest in_core = request;
  in_core.engine.mode = Mode::kGpu;
  in_core.engine.gpu_budget_bytes = 0;
  in_core.hardware.gpu_memory_bytes = 80 * kGiB;
  const Plan tie = make_plan(in_core);
  REQUIRE(tie.fits);
  CHECK(tie.step_seconds == Approx(make_plan(in_order(in_core, MicroBatchOrder::kLayerMajor)).step_seconds));
  CHECK(tie.micro_batch_order == MicroBatchOrder::kBatchMajor);
  // Layer-major needs micro-batches to order.
  request.engine.grad_accumulation = 1;
  CHECK_THROWS_WITH(make_plan(in_order(request, MicroBatchOrder::kLayerMajor)),
                    Contains("layer-major needs grad_accumulation > 1"));
}

TEST_CASE("planner: zo2 uploads only streamed blocks, writes them home on their turns and pays for the replays") {
  PlanRequest request;
  request.model_name = "opt-1.3b";
  request.model = models::preset("opt-1.3b");
  request.engine.mode = Mode::kZo2;
  request.engine.precision = Precision::kBF16;
  request.engine.optimizer.kind = OptimizerKind::kSgd;
  request.batch = 8;
  request.seq = 512;
  request.hardware = synthetic(4);
  // An H100's: its kernels are bound by the draws of z, not by their memory traffic.
  request.hardware.gpu_memory_gbps = 2800;
  request.hardware.zo_normals_per_s = 6e11;
  const std::int64_t blocks = request.model.num_layers;
  const std::uint64_t block_bytes = 2 * static_cast<std::uint64_t>(12 * 2048 * 2048);  // bf16, matrices only

  auto plan = [&](std::int64_t gpu_blocks, std::int64_t interval) {
    PlanRequest r = request;
    r.engine.zo.gpu_blocks = gpu_blocks;
    r.engine.zo.write_back_interval = interval;
    const Plan p = make_plan(r);
    REQUIRE(p.fits);
    return p;
  };
  const auto up = static_cast<int>(Resource::kPcieUp);
  const auto down = static_cast<int>(Resource::kPcieDown);
  const auto compute = static_cast<int>(Resource::kCompute);

  const Plan every_step = plan(0, 1);
  const Plan every_fourth = plan(0, 4);
  const Plan resident = plan(4, 4);
  // Every streamed block goes up each step; home every step, or a quarter of them.
  CHECK(every_step.moved_bytes[up] >= static_cast<std::uint64_t>(blocks) * block_bytes);
  CHECK(every_step.moved_bytes[down] == every_step.moved_bytes[up]);
  CHECK(every_fourth.moved_bytes[up] == every_step.moved_bytes[up]);
  CHECK(every_fourth.moved_bytes[down] * 4 == every_step.moved_bytes[down]);
  // Four resident blocks of the 24 neither go up nor come home.
  CHECK(resident.moved_bytes[up] * blocks == every_step.moved_bytes[up] * (blocks - 4));
  // Replays cost device time: home every fourth step, 3.75 draws per parameter and visit on
  // average (1 to 4 updates, 2 forwards, the pair in place on three visits of four) against 3.
  CHECK(every_fourth.busy_seconds[compute] > every_step.busy_seconds[compute]);

  // Without a figure for the draws the kernels count as memory traffic, which replays barely change.
  request.hardware.zo_normals_per_s = 0;
  const Plan traffic_only = plan(0, 4);
  CHECK(traffic_only.busy_seconds[compute] < every_fourth.busy_seconds[compute]);
}

TEST_CASE("planner: a rank of a data-parallel job holds a 1/N shard of the states and pays for the collectives") {
  PlanRequest request = zero_offload_request();
  request.hardware.link_gbps = 100;
  const Plan one = make_plan(request);
  request.world_size = 4;
  const Plan four = make_plan(request);
  auto role_bytes = [](const Plan& plan, Tier tier, const std::string& role) {
    std::uint64_t bytes = 0;
    for (const PlanItem& item : plan.items) bytes += item.tier == tier && item.role == role ? item.bytes : 0;
    return static_cast<double>(bytes);
  };
  // Shards are padded to the rank count and stored whole pages: a quarter within a page per part.
  for (const std::string& role : {"fp32 master", "optimizer states"}) {
    INFO(role);
    CHECK(role_bytes(one, Tier::kHost, role) > 0);
    CHECK(role_bytes(four, Tier::kHost, role) == Approx(role_bytes(one, Tier::kHost, role) / 4).epsilon(0.01));
  }
  const int optimizer = static_cast<int>(Resource::kCpuOptimizer);
  CHECK(four.busy_seconds[optimizer] == Approx(one.busy_seconds[optimizer] / 4).epsilon(0.01));
  // Each part's bf16 gradients reduce-scattered and its parameters all-gathered: 3/4 of each buffer.
  const int collectives = static_cast<int>(Resource::kCollectives);
  const double expected = 2.0 * 2 * static_cast<double>(request.model.parameter_count()) * 3 / 4;
  CHECK(one.moved_bytes[collectives] == 0);
  CHECK(static_cast<double>(four.moved_bytes[collectives]) == Approx(expected).epsilon(1e-6));
  CHECK(four.busy_seconds[collectives] == Approx(expected / 100e9).epsilon(1e-6));
  CHECK_THAT(format_plan(four), Contains("ranks: 4") && Contains("over 4 ranks"));

  request.hardware.link_gbps = 0;
  const Plan untimed = make_plan(request);
  CHECK(untimed.moved_bytes[collectives] == 0);
  CHECK_THAT(format_plan(untimed), Contains("collectives not timed"));
  request.world_size = 0;
  CHECK_THROWS_WITH(make_plan(request), Contains("world_size = 0"));
}
