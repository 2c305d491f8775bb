// ferry's torch::optim adapters against LibTorch's own optimizers on the same data, state
// save/load in torch's layout, and the tensor errors.

#include <torch/optim.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/types.h>

#include <catch2/catch.hpp>
#include <functional>
#include <limits>
#include <memory>
#include <sstream>
#include <vector>

#include "ferry/check.h"
#include "ferry/torch_optim.h"

namespace ferry {
namespace {

using Params = std::vector<torch::Tensor>;
using MakeOptimizer = std::function<std::unique_ptr<torch::optim::Optimizer>(const Params&)>;

constexpr int kSteps = 100;

// Shapes of a few layers, one of them spanning several tiles with a ragged end.
Params make_params(std::uint64_t seed) {
  torch::manual_seed(seed);
  Params params;
  for (const std::vector<std::int64_t>& shape :
       {std::vector<std::int64_t>{37}, {64, 33}, {5, 7, 9}, {2 * 16384 + 3}}) {
    params.push_back(torch::randn(shape).requires_grad_());
  }
  return params;
}

Params clone(const Params& params) {
  Params copies;
  for (const torch::Tensor& p : params) copies.push_back(p.detach().clone().requires_grad_());
  return copies;
}

// The gradients of step `step`, the same for every optimizer under test.
Params make_grads(const Params& params, int step, torch::ScalarType dtype = torch::kFloat) {
  torch::manual_seed(1000 + step);
  Params grads;
  for (const torch::Tensor& p : params) grads.push_back(torch::randn(p.sizes()).to(dtype));
  return grads;
}

void set_grads(const Params& params, const Params& grads) {
  for (size_t i = 0; i < params.size(); ++i) params[i].mutable_grad() = grads[i].clone();
}

// Largest relative error over all parameters, max|actual - expected| / max|expected| per tensor.
// Note: elementwise relative error is no measure here. LibTorch fuses some of its steps into
// FMAs (which ones depends on the version and the CPU) and ferry never does, so the two
// differ in the last bit of an update; where a weight is near zero that last bit is a large
// fraction of the weight. Relative to the tensor's scale the two agree to about 1e-7.
double max_relative_error(const Params& actual, const Params& expected) {
  double worst = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    const double difference = (actual[i] - expected[i]).abs().max().item<double>();
    worst = std::max(worst, difference / expected[i].abs().max().item<double>());
  }
  return worst;
}

// Runs both optimizers from the same start for `steps` steps on the same gradients.
double compare_with_torch(const MakeOptimizer& make_ferry, const MakeOptimizer& make_torch,
                          int steps = kSteps) {
  const Params start = make_params(42);
  const Params ferry_params = clone(start);
  const Params torch_params = clone(start);
  auto ferry_optimizer = make_ferry(ferry_params);
  auto torch_optimizer = make_torch(torch_params);
  for (int step = 1; step <= steps; ++step) {
    const Params grads = make_grads(start, step);
    set_grads(ferry_params, grads);
    set_grads(torch_params, grads);
    ferry_optimizer->step();
    torch_optimizer->step();
  }
  REQUIRE(max_relative_error(ferry_params, start) > 1e-3);  // the parameters did move
  return max_relative_error(ferry_params, torch_params);
}

TEST_CASE("CpuAdamW matches torch::optim::AdamW over 100 steps", "[optim][torch]") {
  for (double weight_decay : {0.0, 0.01}) {
    const auto options = torch::optim::AdamWOptions(1e-3).betas({0.9, 0.999}).eps(1e-8).weight_decay(weight_decay);
    const double error = compare_with_torch(
        [&](const Params& p) { return std::make_unique<CpuAdamW>(p, options); },
        [&](const Params& p) { return std::make_unique<torch::optim::AdamW>(p, options); });
    INFO("weight_decay " << weight_decay);
    REQUIRE(error <= 1e-6);
  }
}

TEST_CASE("CpuAdam matches torch::optim::Adam over 100 steps", "[optim][torch]") {
  const auto options = torch::optim::AdamOptions(2e-3).betas({0.8, 0.99}).eps(1e-7).weight_decay(0.05);
  const double error = compare_with_torch(
      [&](const Params& p) { return std::make_unique<CpuAdam>(p, options); },
      [&](const Params& p) { return std::make_unique<torch::optim::Adam>(p, options); });
  REQUIRE(error <= 1e-6);
}

TEST_CASE("CpuSGD matches torch::optim::SGD over 100 steps", "[optim][torch]") {
  const std::vector<torch::optim::SGDOptions> settings = {
      torch::optim::SGDOptions(1e-2),
      torch::optim::SGDOptions(1e-2).momentum(0.9).dampening(0.1).weight_decay(1e-3),
      torch::optim::SGDOptions(1e-2).momentum(0.9).nesterov(true).weight_decay(1e-3)};
  for (const auto& options : settings) {
    INFO("momentum " << options.momentum() << " nesterov " << options.nesterov());
    const double error = compare_with_torch(
        [&](const Params& p) { return std::make_unique<CpuSGD>(p, options); },
        [&](const Params& p) { return std::make_unique<torch::optim::SGD>(p, options); });
    REQUIRE(error <= 1e-6);
  }
}

TEST_CASE("CpuAdagrad matches torch::optim::Adagrad over 100 steps", "[optim][torch]") {
  const auto options = torch::optim::AdagradOptions(1e-2)
                           .lr_decay(1e-3)
                           .weight_decay(1e-3)
                           .initial_accumulator_value(0.1)
                           .eps(1e-10);
  const double error = compare_with_torch(
      [&](const Params& p) { return std::make_unique<CpuAdagrad>(p, options); },
      [&](const Params& p) { return std::make_unique<torch::optim::Adagrad>(p, options); });
  REQUIRE(error <= 1e-6);
}

TEST_CASE("CpuAdamW takes bf16 and fp16 gradients", "[optim][torch]") {
  for (torch::ScalarType dtype : {torch::kBFloat16, torch::kHalf}) {
    INFO("gradient dtype " << dtype);
    const Params start = make_params(7);
    const Params low = clone(start);
    const Params widened = clone(start);
    const Params reference = clone(start);
    CpuAdamW low_optimizer(low);
    CpuAdamW widened_optimizer(widened);
    torch::optim::AdamW torch_optimizer(reference);
    for (int step = 1; step <= 20; ++step) {
      const Params grads = make_grads(start, step, dtype);
      Params grads_f32;
      for (const torch::Tensor& g : grads) grads_f32.push_back(g.to(torch::kFloat));
      set_grads(low, grads);
      set_grads(widened, grads_f32);
      set_grads(reference, grads_f32);
      low_optimizer.step();
      widened_optimizer.step();
      torch_optimizer.step();
    }
    for (size_t i = 0; i < low.size(); ++i) REQUIRE(torch::equal(low[i], widened[i]));
    REQUIRE(max_relative_error(low, reference) <= 1e-6);
  }
}

TEST_CASE("a non-finite gradient leaves its parameter and state alone", "[optim][torch]") {
  const Params params = make_params(9);
  CpuAdamW optimizer(params);
  set_grads(params, make_grads(params, 1));
  optimizer.step();
  REQUIRE(optimizer.skipped_in_last_step() == 0);

  Params grads = make_grads(params, 2);
  grads[1].view(-1)[17] = std::numeric_limits<float>::quiet_NaN();
  set_grads(params, grads);
  const Params before = clone(params);
  optimizer.step();
  REQUIRE(optimizer.skipped_in_last_step() == 1);
  REQUIRE(torch::equal(params[1], before[1]));
  REQUIRE_FALSE(torch::equal(params[0], before[0]));
  for (const auto& entry : optimizer.state()) {
    const auto& state = static_cast<const torch::optim::AdamWParamState&>(*entry.second);
    const bool is_skipped = state.exp_avg().numel() == params[1].numel();
    REQUIRE(state.step() == (is_skipped ? 1 : 2));
  }
}

std::string save(const torch::optim::Optimizer& optimizer) {
  torch::serialize::OutputArchive archive;
  optimizer.save(archive);
  std::ostringstream out;
  archive.save_to(out);
  return out.str();
}

void load(torch::optim::Optimizer& optimizer, const std::string& saved) {
  torch::serialize::InputArchive archive;
  std::istringstream in(saved);
  archive.load_from(in);
  optimizer.load(archive);
}

// Steps `optimizer` on `params` with the gradients of steps [first, last].
void run_steps(torch::optim::Optimizer& optimizer, const Params& params, int first, int last) {
  for (int step = first; step <= last; ++step) {
    set_grads(params, make_grads(params, step));
    optimizer.step();
  }
}

TEST_CASE("AdamW state round-trips between ferry and torch", "[optim][torch]") {
  const Params start = make_params(11);

  // The reference: torch's AdamW for 20 uninterrupted steps.
  const Params reference = clone(start);
  torch::optim::AdamW reference_optimizer(reference);
  run_steps(reference_optimizer, reference, 1, 20);

  SECTION("ferry -> ferry continues bit for bit") {
    const Params straight = clone(start);
    CpuAdamW straight_optimizer(straight);
    run_steps(straight_optimizer, straight, 1, 20);

    const Params resumed = clone(start);
    CpuAdamW first_half(resumed);
    run_steps(first_half, resumed, 1, 10);
    CpuAdamW second_half(resumed);
    load(second_half, save(first_half));
    run_steps(second_half, resumed, 11, 20);
    for (size_t i = 0; i < start.size(); ++i) REQUIRE(torch::equal(resumed[i], straight[i]));
  }
  SECTION("torch -> ferry") {
    const Params resumed = clone(start);
    torch::optim::AdamW first_half(resumed);
    run_steps(first_half, resumed, 1, 10);
    CpuAdamW second_half(resumed);
    load(second_half, save(first_half));
    run_steps(second_half, resumed, 11, 20);
    REQUIRE(max_relative_error(resumed, reference) <= 1e-6);
  }
  SECTION("ferry -> torch") {
    const Params resumed = clone(start);
    CpuAdamW first_half(resumed);
    run_steps(first_half, resumed, 1, 10);
    torch::optim::AdamW second_half(resumed);
    load(second_half, save(first_half));
    run_steps(second_half, resumed, 11, 20);
    REQUIRE(max_relative_error(resumed, reference) <= 1e-6);
  }
}

TEST_CASE("SGD and Adagrad state round-trips through torch", "[optim][torch]") {
  const Params start = make_params(13);
  const auto sgd_options = torch::optim::SGDOptions(1e-2).momentum(0.9);
  const Params reference = clone(start);
  torch::optim::SGD reference_sgd(reference, sgd_options);
  run_steps(reference_sgd, reference, 1, 10);
  const Params resumed = clone(start);
  CpuSGD first_half(resumed, sgd_options);
  run_steps(first_half, resumed, 1, 5);
  torch::optim::SGD second_half(resumed, sgd_options);
  load(second_half, save(first_half));
  run_steps(second_half, resumed, 6, 10);
  REQUIRE(max_relative_error(resumed, reference) <= 1e-6);

  const Params adagrad_reference = clone(start);
  torch::optim::Adagrad reference_adagrad(adagrad_reference);
  run_steps(reference_adagrad, adagrad_reference, 1, 10);
  const Params adagrad_resumed = clone(start);
  torch::optim::Adagrad adagrad_first(adagrad_resumed);
  run_steps(adagrad_first, adagrad_resumed, 1, 5);
  CpuAdagrad adagrad_second(adagrad_resumed);
  load(adagrad_second, save(adagrad_first));
  run_steps(adagrad_second, adagrad_resumed, 6, 10);
  REQUIRE(max_relative_error(adagrad_resumed, adagrad_reference) <= 1e-6);
}

TEST_CASE("bad tensors and options are refused with a clear message", "[optim][torch][errors]") {
  const torch::Tensor good = torch::randn({4, 4});
  REQUIRE_THROWS_WITH(CpuAdamW(Params{torch::randn({4, 6}).t()}),
                      Catch::Contains("CpuAdamW: parameter of shape [6, 4] is not contiguous"));
  REQUIRE_THROWS_WITH(CpuAdamW(Params{torch::empty({4}, torch::TensorOptions().device(torch::kMeta))}),
                      Catch::Contains("is on meta; ferry's CPU optimizers need CPU tensors"));
  REQUIRE_THROWS_WITH(CpuAdamW(Params{torch::randn({4}, torch::kDouble)}),
                      Catch::Contains("parameter of shape [4] has dtype Double; it must be float32"));
  REQUIRE_THROWS_WITH(CpuAdamW(Params{good}, torch::optim::AdamWOptions(-1.0)),
                      Catch::Contains("AdamW: lr = -1 is invalid"));
  REQUIRE_THROWS_WITH(CpuAdamW(Params{good}, torch::optim::AdamWOptions().betas({0.9, 1.0})),
                      Catch::Contains("AdamW: beta2 = 1 is invalid; it must be in [0, 1)"));
  REQUIRE_THROWS_WITH(CpuAdamW(Params{good}, torch::optim::AdamWOptions().eps(0)),
                      Catch::Contains("AdamW: eps = 0 is invalid"));
  REQUIRE_THROWS_WITH(CpuAdamW(Params{good}, torch::optim::AdamWOptions().amsgrad(true)),
                      Catch::Contains("amsgrad = true is not supported"));
  REQUIRE_THROWS_WITH(CpuSGD(Params{good}, torch::optim::SGDOptions(0.1).nesterov(true)),
                      Catch::Contains("nesterov needs momentum > 0"));
  REQUIRE_THROWS_WITH(CpuAdagrad(Params{good}, torch::optim::AdagradOptions().eps(-1)),
                      Catch::Contains("Adagrad: eps = -1 is invalid"));

  const torch::Tensor param = torch::randn({4, 4}).requires_grad_();
  CpuAdamW optimizer(Params{param});
  param.mutable_grad() = torch::randn({4, 4}, torch::kDouble);
  REQUIRE_THROWS_WITH(optimizer.step(),
                      Catch::Contains("gradient of shape [4, 4] has dtype Double; gradients must be float32, bfloat16 or float16"));
  param.mutable_grad() = torch::randn({4, 8}).narrow(1, 0, 4);
  REQUIRE_THROWS_WITH(optimizer.step(), Catch::Contains("gradient of shape [4, 4] is not contiguous"));
  param.mutable_grad() = torch::randn({5});
  REQUIRE_THROWS_WITH(optimizer.step(), Catch::Contains("gradient of shape [5] does not match its parameter of shape [4, 4]"));
}

}  // namespace
}  // namespace ferry
