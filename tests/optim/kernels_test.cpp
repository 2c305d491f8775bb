// The span kernels: every ISA against the scalar reference bit for bit, the bf16/fp16
// conversions against c10's, gradient unscaling and clipping, non-finite gradients, grad_stats.

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <catch2/catch.hpp>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "ferry/check.h"
#include "ferry/optim.h"
#include "optim/low_precision.h"

namespace ferry::optim {
namespace {

using detail::bf16_to_float;
using detail::bits_float;
using detail::f16_to_float;
using detail::float_bits;
using detail::float_to_bf16;
using detail::float_to_f16;

// Restores the process-wide ISA and thread count a test changed.
class IsaGuard {
 public:
  IsaGuard() : isa_(active_isa()) {}
  ~IsaGuard() { set_isa(isa_); }

 private:
  Isa isa_;
};

std::vector<Isa> vector_isas() {
  std::vector<Isa> isas;
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512}) {
    if (isa_supported(isa)) isas.push_back(isa);
  }
  return isas;
}

// Values that exercise rounding: ordinary magnitudes plus zeros, fp32 denormals, fp16
// subnormals and values beyond fp16's range.
std::vector<float> awkward_values(std::int64_t size, std::uint32_t seed, float scale) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::uniform_int_distribution<int> kind(0, 19);
  std::vector<float> values(size);
  for (float& value : values) {
    switch (kind(rng)) {
      case 0: value = 0.0f; break;
      case 1: value = normal(rng) * 1e-40f; break;  // fp32 denormal
      case 2: value = normal(rng) * 1e-6f; break;   // fp16 subnormal
      case 3: value = normal(rng) * 1e5f; break;    // beyond fp16's max
      default: value = normal(rng);
    }
  }
  return values;
}

std::vector<float> finite_in_f16(std::vector<float> values) {
  for (float& value : values) value = std::max(-60000.0f, std::min(value, 60000.0f));
  return values;
}

std::vector<std::uint16_t> to_bf16(const std::vector<float>& values) {
  std::vector<std::uint16_t> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = float_to_bf16(values[i]);
  return out;
}

std::vector<std::uint16_t> to_f16(const std::vector<float>& values) {
  std::vector<std::uint16_t> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = float_to_f16(values[i]);
  return out;
}

// One span's worth of optimizer data, with every buffer an algorithm might touch.
struct Problem {
  std::vector<float> master, state1, state2, grad_f32;
  std::vector<std::uint16_t> grad_bf16, grad_f16, out;

  Problem(std::int64_t size, std::uint32_t seed)
      : master(awkward_values(size, seed, 1.0f)),
        state1(awkward_values(size, seed + 1, 0.1f)),
        state2(size),
        grad_f32(finite_in_f16(awkward_values(size, seed + 2, 0.5f))),
        grad_bf16(to_bf16(grad_f32)),
        grad_f16(to_f16(grad_f32)),
        out(size) {
    for (std::int64_t i = 0; i < size; ++i) state2[i] = std::abs(state1[i]) * 0.5f;
  }

  std::int64_t size() const { return static_cast<std::int64_t>(master.size()); }
  FloatSpan span(std::vector<float>& v) { return FloatSpan{v.data(), size()}; }
  GradSpan grad(DType dtype) const {
    switch (dtype) {
      case DType::kF32: return GradSpan::f32(grad_f32.data(), size());
      case DType::kBF16: return GradSpan::bf16(grad_bf16.data(), size());
      case DType::kF16: return GradSpan::f16(grad_f16.data(), size());
    }
    return {};
  }
  OutputSpan output(bool enabled, DType dtype) {
    return enabled ? OutputSpan{out.data(), size(), dtype} : OutputSpan{};
  }
  bool bits_equal(const Problem& other) const {
    auto same = [](const auto& a, const auto& b) {
      return std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0])) == 0;
    };
    return same(master, other.master) && same(state1, other.state1) &&
           same(state2, other.state2) && same(out, other.out);
  }
};

enum class Algorithm { kAdamW, kAdam, kSgd, kSgdNesterov, kAdagrad };

const char* algorithm_name(Algorithm algorithm) {
  switch (algorithm) {
    case Algorithm::kAdamW: return "adamw";
    case Algorithm::kAdam: return "adam";
    case Algorithm::kSgd: return "sgd";
    case Algorithm::kSgdNesterov: return "sgd-nesterov";
    case Algorithm::kAdagrad: return "adagrad";
  }
  return "?";
}

StepReport run_algorithm(Algorithm algorithm, Problem& problem, const StepContext& context,
                         DType grad_dtype, OutputSpan out) {
  FloatSpan master = problem.span(problem.master);
  FloatSpan state1 = problem.span(problem.state1);
  FloatSpan state2 = problem.span(problem.state2);
  const GradSpan grad = problem.grad(grad_dtype);
  switch (algorithm) {
    case Algorithm::kAdamW:
      return adamw_step(AdamWParams{1e-3, 0.9, 0.999, 1e-8, 0.01}, context, master, state1,
                        state2, grad, out);
    case Algorithm::kAdam:
      return adam_step(AdamParams{1e-3, 0.8, 0.99, 1e-6, 0.1}, context, master, state1, state2,
                       grad, out);
    case Algorithm::kSgd:
      return sgd_step(SgdParams{0.05, 0.9, 0.1, 0.01, false}, context, master, state1, grad, out);
    case Algorithm::kSgdNesterov:
      return sgd_step(SgdParams{0.05, 0.9, 0.0, 0.0, true}, context, master, state1, grad, out);
    case Algorithm::kAdagrad:
      return adagrad_step(AdagradParams{0.1, 0.01, 0.001, 1e-10}, context, master, state2, grad,
                          out);
  }
  return {};
}

TEST_CASE("bf16 narrowing rounds to nearest-even like c10::BFloat16", "[optim][convert]") {
  std::mt19937 rng(1);
  for (int i = 0; i < 1000000; ++i) {
    const float value = bits_float(rng());
    if (std::isnan(value)) {
      REQUIRE(std::isnan(bf16_to_float(float_to_bf16(value))));
      continue;
    }
    REQUIRE(float_to_bf16(value) == c10::BFloat16(value).x);
  }
  // Ties go to even, both ways.
  REQUIRE(float_to_bf16(bits_float(0x3F808000u)) == 0x3F80);
  REQUIRE(float_to_bf16(bits_float(0x3F818000u)) == 0x3F82);
  REQUIRE(float_to_bf16(bits_float(0x7F7FFFFFu)) == 0x7F80);  // FLT_MAX overflows to Inf
}

TEST_CASE("fp16 conversions match c10::Half in both directions", "[optim][convert]") {
  for (std::uint32_t half = 0; half <= 0xFFFF; ++half) {
    const auto h = static_cast<std::uint16_t>(half);
    const float widened = f16_to_float(h);
    const float expected = c10::Half(h, c10::Half::from_bits());
    if (std::isnan(expected)) {
      REQUIRE(std::isnan(widened));
    } else {
      REQUIRE(float_bits(widened) == float_bits(expected));
      REQUIRE(float_to_f16(widened) == h);
    }
  }
  std::mt19937 rng(2);
  std::uniform_int_distribution<std::uint32_t> near_fp16_range(0x30000000u, 0x48000000u);
  for (int i = 0; i < 1000000; ++i) {
    const std::uint32_t sign = (rng() & 1u) << 31;
    const float value = bits_float(sign | (i % 2 == 0 ? near_fp16_range(rng) : rng() & 0x7FFFFFFFu));
    if (std::isnan(value)) continue;
    REQUIRE(float_to_f16(value) == c10::Half(value).x);
  }
}

TEST_CASE("every vector ISA reproduces the scalar reference bit for bit", "[optim][isa]") {
  IsaGuard guard;
  const std::vector<Isa> isas = vector_isas();
  if (isas.empty()) {
    WARN("this CPU has neither AVX2 nor AVX-512: only the scalar path runs");
    return;
  }
  // Several tiles and a ragged end, plus spans shorter than one register.
  for (std::int64_t size : {std::int64_t{2 * 16384 + 37}, std::int64_t{1}, std::int64_t{15},
                            std::int64_t{33}}) {
    for (Algorithm algorithm : {Algorithm::kAdamW, Algorithm::kAdam, Algorithm::kSgd,
                                Algorithm::kSgdNesterov, Algorithm::kAdagrad}) {
      for (DType grad_dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
        for (int copy = 0; copy < 3; ++copy) {
          const bool with_copy = copy != 0;
          const DType out_dtype = copy == 2 ? DType::kF16 : DType::kBF16;
          Problem reference(size, 7);
          set_isa(Isa::kScalar);
          StepContext context;
          context.grad_scale = 1024.0;
          context.clip_coef = 0.75;
          for (context.step = 1; context.step <= 3; ++context.step) {
            REQUIRE_FALSE(run_algorithm(algorithm, reference, context, grad_dtype,
                                        reference.output(with_copy, out_dtype))
                              .skipped);
          }
          for (Isa isa : isas) {
            INFO(algorithm_name(algorithm) << " on " << isa_name(isa) << ", " << size
                                           << " elements, grad " << dtype_name(grad_dtype)
                                           << ", copy " << copy);
            Problem candidate(size, 7);
            set_isa(isa);
            for (context.step = 1; context.step <= 3; ++context.step) {
              run_algorithm(algorithm, candidate, context, grad_dtype,
                            candidate.output(with_copy, out_dtype));
            }
            REQUIRE(candidate.bits_equal(reference));
          }
        }
      }
    }
  }
}

TEST_CASE("the low-precision copy is the updated master rounded to nearest-even", "[optim]") {
  Problem problem(5000, 3);
  run_algorithm(Algorithm::kAdamW, problem, StepContext{}, DType::kF32,
                problem.output(true, DType::kBF16));
  for (std::int64_t i = 0; i < problem.size(); ++i) {
    REQUIRE(problem.out[i] == c10::BFloat16(problem.master[i]).x);
  }
  run_algorithm(Algorithm::kAdamW, problem, StepContext{2}, DType::kF32,
                problem.output(true, DType::kF16));
  for (std::int64_t i = 0; i < problem.size(); ++i) {
    REQUIRE(problem.out[i] == c10::Half(problem.master[i]).x);
  }
}

TEST_CASE("unscaling and clipping equal pre-multiplied gradients", "[optim]") {
  // Power-of-two factors are exact, so the results must be bit-identical.
  Problem scaled(4096, 5);
  Problem plain(4096, 5);
  for (float& g : scaled.grad_f32) g *= 256.0f;
  for (float& g : plain.grad_f32) g *= 0.5f;
  StepContext context;
  context.grad_scale = 256.0;
  context.clip_coef = 0.5;
  run_algorithm(Algorithm::kAdamW, scaled, context, DType::kF32, {});
  run_algorithm(Algorithm::kAdamW, plain, StepContext{}, DType::kF32, {});
  REQUIRE(scaled.bits_equal(plain));
}

TEST_CASE("bf16 and fp16 gradients give the step of their exact fp32 widening", "[optim]") {
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    Problem low(3 * 16384 + 5, 11);
    Problem widened(3 * 16384 + 5, 11);
    for (std::int64_t i = 0; i < widened.size(); ++i) {
      widened.grad_f32[i] = dtype == DType::kBF16 ? bf16_to_float(low.grad_bf16[i])
                                                  : f16_to_float(low.grad_f16[i]);
    }
    run_algorithm(Algorithm::kAdamW, low, StepContext{}, dtype, {});
    run_algorithm(Algorithm::kAdamW, widened, StepContext{}, DType::kF32, {});
    REQUIRE(low.bits_equal(widened));
  }
}

TEST_CASE("a non-finite gradient skips the whole span and changes nothing", "[optim]") {
  const std::int64_t size = 4 * 16384 + 3;
  for (Algorithm algorithm : {Algorithm::kAdamW, Algorithm::kAdam, Algorithm::kSgd,
                              Algorithm::kAdagrad}) {
    for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
      for (float bad : {std::numeric_limits<float>::infinity(),
                        -std::numeric_limits<float>::infinity(),
                        std::numeric_limits<float>::quiet_NaN()}) {
        INFO(algorithm_name(algorithm) << ", grad " << dtype_name(dtype) << ", bad " << bad);
        Problem problem(size, 13);
        const std::int64_t where = size - 2;  // in the last tile: earlier tiles are all finite
        problem.grad_f32[where] = bad;
        problem.grad_bf16[where] = float_to_bf16(bad);
        problem.grad_f16[where] = float_to_f16(bad);
        const Problem before = problem;
        const StepReport report =
            run_algorithm(algorithm, problem, StepContext{}, dtype, problem.output(true, DType::kBF16));
        REQUIRE(report.skipped);
        REQUIRE(problem.bits_equal(before));
        REQUIRE_FALSE(grad_stats(problem.grad(dtype)).finite);
      }
    }
  }
}

TEST_CASE("a finite gradient is stepped whether or not it was pre-checked", "[optim]") {
  Problem checked(20000, 17);
  Problem unchecked(20000, 17);
  StepContext context;
  context.grad_checked_finite = true;
  REQUIRE_FALSE(run_algorithm(Algorithm::kAdamW, checked, context, DType::kF32, {}).skipped);
  REQUIRE_FALSE(run_algorithm(Algorithm::kAdamW, unchecked, StepContext{}, DType::kF32, {}).skipped);
  REQUIRE(checked.bits_equal(unchecked));
  REQUIRE_FALSE(checked.bits_equal(Problem(20000, 17)));
}

TEST_CASE("grad_stats sums squares in fp64, the same on every ISA and thread count", "[optim]") {
  IsaGuard guard;
  const Problem problem(5 * 16384 + 77, 19);
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    const GradSpan grad = problem.grad(dtype);
    long double exact = 0;
    for (std::int64_t i = 0; i < grad.size; ++i) {
      const float g = dtype == DType::kF32    ? problem.grad_f32[i]
                      : dtype == DType::kBF16 ? bf16_to_float(problem.grad_bf16[i])
                                              : f16_to_float(problem.grad_f16[i]);
      exact += static_cast<long double>(g) * g;
    }
    set_isa(Isa::kScalar);
    const GradStats reference = grad_stats(grad);
    REQUIRE(reference.finite);
    REQUIRE(std::abs(reference.sum_squares - static_cast<double>(exact)) <=
            1e-12 * static_cast<double>(exact));
    for (Isa isa : vector_isas()) {
      set_isa(isa);
      REQUIRE(grad_stats(grad).sum_squares == reference.sum_squares);
    }
    set_num_threads(1);
    REQUIRE(grad_stats(grad).sum_squares == reference.sum_squares);
    set_num_threads(0);
  }
  REQUIRE(grad_stats(GradSpan::f32(nullptr, 0)).sum_squares == 0.0);
}

TEST_CASE("the thread count does not change a step's result", "[optim]") {
  Problem one(6 * 16384 + 1, 23);
  Problem all(6 * 16384 + 1, 23);
  set_num_threads(1);
  REQUIRE(num_threads() == 1);
  run_algorithm(Algorithm::kAdamW, one, StepContext{}, DType::kBF16, one.output(true, DType::kBF16));
  set_num_threads(0);
  REQUIRE(num_threads() >= 1);
  run_algorithm(Algorithm::kAdamW, all, StepContext{}, DType::kBF16, all.output(true, DType::kBF16));
  REQUIRE(one.bits_equal(all));
}

TEST_CASE("bad arguments name the value and what would be valid", "[optim][errors]") {
  Problem problem(64, 29);
  FloatSpan master = problem.span(problem.master);
  FloatSpan m = problem.span(problem.state1);
  FloatSpan v = problem.span(problem.state2);
  const GradSpan grad = problem.grad(DType::kF32);
  const AdamWParams good;
  auto adamw = [&](AdamWParams params, StepContext context, FloatSpan exp_avg, GradSpan g,
                   OutputSpan out) { adamw_step(params, context, master, exp_avg, v, g, out); };

  FloatSpan short_m{m.data, 63};
  REQUIRE_THROWS_WITH(adamw(good, {}, short_m, grad, {}),
                      Catch::Contains("exp_avg has 63 elements but master has 64"));
  REQUIRE_THROWS_WITH(adamw(good, {}, m, GradSpan::f32(problem.grad_f32.data(), 65), {}),
                      Catch::Contains("grad has 65 elements"));
  REQUIRE_THROWS_WITH(adamw(good, {}, m, GradSpan{grad.data, 64, static_cast<DType>(7)}, {}),
                      Catch::Contains("grad dtype 7 is unsupported; valid: f32, bf16, f16"));
  REQUIRE_THROWS_WITH(adamw(good, {}, m, grad, OutputSpan{problem.out.data(), 64, DType::kF32}),
                      Catch::Contains("out dtype f32 is unsupported"));
  REQUIRE_THROWS_WITH(adamw(good, {}, m, grad, OutputSpan{problem.out.data(), 8, DType::kBF16}),
                      Catch::Contains("out has 8 elements but master has 64"));
  REQUIRE_THROWS_WITH(adamw(good, {}, FloatSpan{nullptr, 64}, grad, {}),
                      Catch::Contains("exp_avg is null"));

  AdamWParams bad = good;
  bad.lr = -1;
  REQUIRE_THROWS_WITH(adamw(bad, {}, m, grad, {}), Catch::Contains("lr = -1 is invalid; it must be finite and >= 0"));
  bad = good;
  bad.beta1 = 1.0;
  REQUIRE_THROWS_WITH(adamw(bad, {}, m, grad, {}), Catch::Contains("beta1 = 1 is invalid; it must be in [0, 1)"));
  bad = good;
  bad.beta2 = -0.5;
  REQUIRE_THROWS_WITH(adamw(bad, {}, m, grad, {}), Catch::Contains("beta2 = -0.5 is invalid"));
  bad = good;
  bad.eps = 0;
  REQUIRE_THROWS_WITH(adamw(bad, {}, m, grad, {}), Catch::Contains("eps = 0 is invalid; it must be finite and > 0"));
  bad = good;
  bad.weight_decay = -0.1;
  REQUIRE_THROWS_WITH(adamw(bad, {}, m, grad, {}), Catch::Contains("weight_decay = -0.1 is invalid"));

  REQUIRE_THROWS_WITH(adamw(good, StepContext{0}, m, grad, {}),
                      Catch::Contains("step 0 is invalid; steps count from 1"));
  StepContext context;
  context.grad_scale = 0;
  REQUIRE_THROWS_WITH(adamw(good, context, m, grad, {}), Catch::Contains("grad_scale 0 is invalid"));
  context = StepContext{};
  context.clip_coef = std::numeric_limits<double>::infinity();
  REQUIRE_THROWS_WITH(adamw(good, context, m, grad, {}), Catch::Contains("clip_coef inf is invalid"));

  REQUIRE_THROWS_WITH(adam_step(AdamParams{1e-3, 0.9, 0.999, -1e-8, 0}, {}, master, m, v, grad),
                      Catch::Contains("Adam: eps = -1e-08 is invalid"));
  REQUIRE_THROWS_WITH(sgd_step(SgdParams{0.1, 0.0, 0.0, 0.0, true}, {}, master, {}, grad),
                      Catch::Contains("nesterov needs momentum > 0 and dampening = 0"));
  REQUIRE_THROWS_WITH(sgd_step(SgdParams{0.1, 0.9, 0.0, 0.0, false}, {}, master, {}, grad),
                      Catch::Contains("momentum_buffer has 0 elements but master has 64"));
  REQUIRE_THROWS_WITH(adagrad_step(AdagradParams{0.1, -1.0, 0.0, 1e-10}, {}, master, v, grad),
                      Catch::Contains("lr_decay = -1 is invalid"));

  REQUIRE_THROWS_WITH(parse_isa("sse2"), Catch::Contains("unknown optimizer ISA 'sse2'; valid: scalar, avx2, avx512"));
  REQUIRE_THROWS_WITH(set_num_threads(-2), Catch::Contains("thread count -2 is invalid"));
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512}) {
    if (!isa_supported(isa)) {
      REQUIRE_THROWS_WITH(set_isa(isa), Catch::Contains("this CPU lacks that ISA"));
    }
  }
}

}  // namespace
}  // namespace ferry::optim
