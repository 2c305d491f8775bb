// The zeroth-order kernels: the regenerated directions and the fused update-and-perturb pass.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if __has_include(<c10/util/Float8_e4m3fn.h>)
#include <c10/util/Float8_e4m3fn.h>
#define FERRY_TEST_C10_FLOAT8 1
#endif

#include <catch2/catch.hpp>

#include "ferry/zo.h"
#include "optim/low_precision.h"

using namespace ferry::optim;

TEST_CASE("zo directions are standard normals, regenerated identically from any offset") {
  const ZoDirection direction{1234, 3};
  std::vector<float> z(1 << 18);
  zo_normals(direction, 0, z.data(), static_cast<std::int64_t>(z.size()));
  double sum = 0, squares = 0;
  for (float value : z) {
    REQUIRE(std::isfinite(value));
    sum += value;
    squares += double{value} * value;
  }
  const double mean = sum / z.size();
  CHECK(std::abs(mean) < 0.01);
  CHECK(std::abs(squares / z.size() - mean * mean - 1.0) < 0.01);

  std::vector<float> tail(1001);
  zo_normals(direction, 777, tail.data(), 1001);
  for (std::size_t i = 0; i < tail.size(); ++i) REQUIRE(tail[i] == z[777 + i]);

  std::vector<float> other(1000);
  zo_normals({1234, 4}, 0, other.data(), 1000);
  int equal = 0;
  for (std::size_t i = 0; i < other.size(); ++i) equal += other[i] == z[i];
  CHECK(equal == 0);
}

TEST_CASE("zo_apply writes weights + scale z without an update") {
  const std::int64_t n = 40000 + 3;  // several tiles and a partial group of four
  std::vector<float> weights(n), compute(n), z(n);
  for (std::int64_t i = 0; i < n; ++i) weights[i] = 0.001f * static_cast<float>(i % 97);
  zo_normals({9, 1}, 0, z.data(), n);
  ZoTensors tensors{weights.data(), DType::kF32, nullptr, nullptr, compute.data(), DType::kF32, n};
  zo_apply(tensors, nullptr, 0, {{9, 1}, -0.5f});
  for (std::int64_t i = 0; i < n; ++i) REQUIRE(compute[i] == weights[i] + -0.5f * z[i]);
  zo_apply(tensors, nullptr, 0, {{9, 1}, 0.0f});
  for (std::int64_t i = 0; i < n; ++i) REQUIRE(compute[i] == weights[i]);
}

TEST_CASE("zo_apply's opposite copy is the pass with the negated scale, also written over the weights") {
  const std::int64_t n = 40000 + 3;
  std::vector<std::uint16_t> start(n);
  for (std::int64_t i = 0; i < n; ++i) start[i] = ferry::optim::detail::float_to_bf16(0.001f * static_cast<float>(i % 97) - 0.03f);
  ZoUpdate update = zo_sgd_update(0.01f, 5, 2.5f);
  update.stream = 3;
  const ZoPerturb plus{{6, 3}, 1e-2f}, minus{{6, 3}, -1e-2f};

  // Separately: the update with the + copy, then the - copy from the updated weights.
  std::vector<std::uint16_t> weights = start, expected_plus(n), expected_minus(n);
  zo_apply({weights.data(), DType::kBF16, nullptr, nullptr, expected_plus.data(), DType::kBF16, n}, &update, 1, plus);
  zo_apply({weights.data(), DType::kBF16, nullptr, nullptr, expected_minus.data(), DType::kBF16, n}, nullptr, 0, minus);
  const std::vector<std::uint16_t> updated = weights;

  std::vector<std::uint16_t> compute(n), opposite(n);
  weights = start;
  zo_apply({weights.data(), DType::kBF16, nullptr, nullptr, compute.data(), DType::kBF16, n, opposite.data()}, &update,
           1, plus);
  CHECK(compute == expected_plus);
  CHECK(opposite == expected_minus);
  CHECK(weights == updated);

  weights = start;
  zo_apply({weights.data(), DType::kBF16, nullptr, nullptr, compute.data(), DType::kBF16, n, weights.data()}, &update,
           1, plus);
  CHECK(compute == expected_plus);
  CHECK(weights == expected_minus);

  std::vector<float> fp32_compute(n);
  CHECK_THROWS_WITH(zo_apply({weights.data(), DType::kBF16, nullptr, nullptr, fp32_compute.data(), DType::kF32, n,
                              weights.data()}, nullptr, 0, plus),
                    Catch::Contains("only when they are in the compute dtype"));
}

TEST_CASE("zo_apply's sgd update follows theta - (g z + wd theta) lr, decay on the leading range") {
  const std::int64_t n = 1000;
  std::vector<float> weights(n, 0.5f), compute(n), z_old(n), z_new(n);
  zo_normals({5, 2}, 0, z_old.data(), n);
  zo_normals({6, 2}, 0, z_new.data(), n);
  ZoUpdate update;
  update.lr = 0.01f;
  update.weight_decay = 0.1f;
  update.samples = 1;
  update.seeds[0] = 5;
  update.projected_grads[0] = 2.5f;
  update.stream = 2;
  update.decay_count = 600;
  ZoTensors tensors{weights.data(), DType::kF32, nullptr, nullptr, compute.data(), DType::kF32, n};
  zo_apply(tensors, &update, 1, {{6, 2}, 1e-3f});
  for (std::int64_t i = 0; i < n; ++i) {
    float d = 2.5f * z_old[i];
    if (i < 600) d = d + 0.1f * 0.5f;
    const float expected = 0.5f - d * 0.01f;
    REQUIRE(weights[i] == expected);
    REQUIRE(compute[i] == expected + 1e-3f * z_new[i]);
  }
}

TEST_CASE("zo_apply with bf16 weights perturbs from the rounded stored value") {
  const std::int64_t n = 64;
  std::vector<std::uint16_t> weights(n, 0x3F80);  // 1.0 in bf16
  std::vector<float> compute(n), state0(n, 0.0f);
  ZoUpdate update;
  update.lr = 1e-6f;  // far below half a bf16 ulp of 1.0: the stored weights do not move
  update.momentum = 0.9f;
  update.samples = 1;
  update.seeds[0] = 1;
  update.projected_grads[0] = 1.0f;
  ZoTensors tensors{weights.data(), DType::kBF16, state0.data(), nullptr, compute.data(), DType::kF32, n};
  zo_apply(tensors, &update, 1, {{2, 0}, 0.0f});
  for (std::int64_t i = 0; i < n; ++i) {
    REQUIRE(weights[i] == 0x3F80);
    REQUIRE(compute[i] == 1.0f);
    REQUIRE(state0[i] != 0.0f);  // the momentum still saw the update
  }
}

TEST_CASE("zo_apply rejects updates it cannot run") {
  std::vector<float> weights(8), compute(8);
  ZoTensors tensors{weights.data(), DType::kF32, nullptr, nullptr, compute.data(), DType::kF32, 8};
  ZoUpdate update;
  update.samples = 0;
  CHECK_THROWS_WITH(zo_apply(tensors, &update, 1, {}), Catch::Contains("1 to 16 samples"));
  update.samples = 1;
  update.rule = ZoRule::kAdam;
  CHECK_THROWS_WITH(zo_apply(tensors, &update, 1, {}), Catch::Contains("state0"));
}

TEST_CASE("zo_apply replays several updates exactly as separate passes would") {
  const std::int64_t n = 5000;
  std::vector<std::uint16_t> once(n), replayed(n);
  for (std::int64_t i = 0; i < n; ++i) once[i] = replayed[i] = static_cast<std::uint16_t>(0x3C00 + i % 50);
  std::vector<float> m_once(n, 0.0f), v_once(n, 0.0f), m_replayed(n, 0.0f), v_replayed(n, 0.0f);
  std::vector<float> compute_once(n), compute_replayed(n);
  ZoUpdate updates[3];
  for (int u = 0; u < 3; ++u) {
    updates[u].rule = ZoRule::kAdamW;
    updates[u].lr = 1e-3f;
    updates[u].weight_decay = 0.1f;
    updates[u].bias_correction1 = 1.0f - std::pow(0.9f, static_cast<float>(u + 1));
    updates[u].bias_correction2_sqrt = std::sqrt(1.0f - std::pow(0.999f, static_cast<float>(u + 1)));
    updates[u].samples = 2;
    updates[u].seeds[0] = 10 + u;
    updates[u].seeds[1] = 20 + u;
    updates[u].projected_grads[0] = 0.5f * static_cast<float>(u + 1);
    updates[u].projected_grads[1] = -1.5f;
    updates[u].stream = 4;
    updates[u].decay_count = 3000;
  }
  ZoTensors a{once.data(), DType::kF16, m_once.data(), v_once.data(), compute_once.data(), DType::kBF16, n};
  for (int u = 0; u < 3; ++u) zo_apply(a, &updates[u], 1, {{99, 4}, 0.25f});
  ZoTensors b{replayed.data(), DType::kF16, m_replayed.data(), v_replayed.data(), compute_replayed.data(),
              DType::kBF16, n};
  zo_apply(b, updates, 3, {{99, 4}, 0.25f});
  REQUIRE(once == replayed);
  REQUIRE(m_once == m_replayed);
  REQUIRE(v_once == v_replayed);
  REQUIRE(compute_once == compute_replayed);
}

namespace {

// The finite fp8 e4m3fn values in code order (0x00 .. 0x7E), built from the format's definition.
std::vector<float> fp8_values() {
  std::vector<float> values;
  for (int code = 0; code < 0x7F; ++code) {
    const int exponent = code >> 3, mantissa = code & 7;
    values.push_back(exponent == 0 ? std::ldexp(mantissa / 8.0f, -6)
                                   : std::ldexp(1.0f + mantissa / 8.0f, exponent - 7));
  }
  return values;
}

// Segment ends of a part of n elements cut into tensors at odd places, one of them empty.
std::vector<std::int64_t> segments_of(std::int64_t n) { return {7, 1003, 1003, 20001, n}; }

}  // namespace

TEST_CASE("fp8 e4m3fn decodes every code as the format defines it") {
  const std::vector<float> values = fp8_values();
  for (int code = 0; code < 0x7F; ++code) {
    INFO("code " << code);
    REQUIRE(fp8_e4m3_decode(static_cast<std::uint8_t>(code)) == values[code]);
    REQUIRE(fp8_e4m3_decode(static_cast<std::uint8_t>(code | 0x80)) == -values[code]);
    REQUIRE(fp8_e4m3_encode(values[code]) == code);
    REQUIRE(fp8_e4m3_encode(-values[code]) == (code | 0x80));
  }
  CHECK(values[0x7E] == kFp8E4M3Max);
  CHECK(std::isnan(fp8_e4m3_decode(0x7F)));
  CHECK(std::isnan(fp8_e4m3_decode(0xFF)));
}

TEST_CASE("fp8 e4m3fn encodes to the nearest value, ties to even, saturating at 448") {
  const std::vector<float> values = fp8_values();
  // Every midpoint between neighbours rounds to the even code; just off it, to the nearer one.
  for (int code = 0; code + 1 < 0x7F; ++code) {
    const float middle = (values[code] + values[code + 1]) / 2;
    INFO("between codes " << code << " and " << code + 1);
    REQUIRE(fp8_e4m3_encode(middle) == (code % 2 == 0 ? code : code + 1));
    REQUIRE(fp8_e4m3_encode(std::nextafter(middle, 0.0f)) == code);
    REQUIRE(fp8_e4m3_encode(std::nextafter(middle, 1000.0f)) == code + 1);
  }
  CHECK(fp8_e4m3_encode(447.0f) == 0x7E);
  CHECK(fp8_e4m3_encode(470.0f) == 0x7E);
  CHECK(fp8_e4m3_encode(1e30f) == 0x7E);
  CHECK(fp8_e4m3_encode(-INFINITY) == 0xFE);
  CHECK(fp8_e4m3_encode(NAN) == 0x7F);
  CHECK(fp8_e4m3_encode(1e-30f) == 0x00);   // far below half the smallest subnormal
  CHECK(fp8_e4m3_encode(-1e-30f) == 0x80);  // keeps its sign
}

#if defined(FERRY_TEST_C10_FLOAT8)
TEST_CASE("fp8 e4m3fn encoding equals c10::Float8_e4m3fn's on [-448, 448]") {
  std::uint32_t state = 12345;
  for (int i = 0; i < 1000000; ++i) {
    state = state * 1664525u + 1013904223u;
    // Magnitudes spread over fp8's whole range, subnormals included.
    const float fraction = static_cast<float>(state >> 8) / 16777216.0f;
    const float value = std::ldexp(fraction, static_cast<int>(state % 21) - 11) * ((state & 1) ? -1.0f : 1.0f);
    if (std::fabs(value) > kFp8E4M3Max) continue;
    REQUIRE(fp8_e4m3_encode(value) == c10::Float8_e4m3fn(value).x);
  }
}
#endif

TEST_CASE("zo_update_and_encode applies the update as zo_apply does, then encodes the result") {
  const std::int64_t n = 40000 + 3;
  std::vector<float> weights(n), expected(n), m(n, 0.0f), m_expected(n, 0.0f);
  for (std::int64_t i = 0; i < n; ++i) weights[i] = expected[i] = 0.01f * std::sin(0.1f * static_cast<float>(i));
  // A tensor of its own scale.
  for (std::int64_t i = 1003; i < 20001; ++i) weights[i] = expected[i] = 3.0f * weights[i];
  ZoUpdate update;
  update.lr = 1e-3f;
  update.momentum = 0.9f;
  update.samples = 1;
  update.seeds[0] = 8;
  update.projected_grads[0] = -2.0f;
  update.stream = 3;
  ZoTensors plain{expected.data(), DType::kF32, m_expected.data(), nullptr, nullptr, DType::kF32, n};
  zo_apply(plain, &update, 1, {});
  ZoTensors stored{weights.data(), DType::kF32, m.data(), nullptr, nullptr, DType::kF32, n};

  SECTION("bf16") {
    std::vector<std::uint16_t> codes(n);
    ZoTransferCopy transfer{ZoTransferFormat::kBF16, codes.data(), nullptr, nullptr, 0, n};
    zo_update_and_encode(stored, &update, 1, transfer);
    REQUIRE(weights == expected);
    REQUIRE(m == m_expected);
    std::vector<float> decoded(n);
    zo_perturb_transfer(transfer, decoded.data(), DType::kF32, {});
    for (std::int64_t i = 0; i < n; ++i) {
      REQUIRE(std::fabs(decoded[i] - expected[i]) <= std::fabs(expected[i]) / 256);
    }
  }
  SECTION("fp8, one scale per segment") {
    const std::vector<std::int64_t> ends = segments_of(n);
    std::vector<std::uint8_t> codes(n);
    std::vector<float> scales(ends.size());
    ZoTransferCopy transfer{ZoTransferFormat::kFp8E4M3, codes.data(), scales.data(), ends.data(),
                            static_cast<int>(ends.size()), n};
    zo_update_and_encode(stored, &update, 1, transfer);
    REQUIRE(weights == expected);
    std::int64_t begin = 0;
    for (std::size_t s = 0; s < ends.size(); ++s) {
      float amax = 0;
      for (std::int64_t i = begin; i < ends[s]; ++i) amax = std::max(amax, std::fabs(expected[i]));
      INFO("segment " << s);
      REQUIRE(scales[s] == (amax > 0 ? amax / kFp8E4M3Max : 1.0f));
      for (std::int64_t i = begin; i < ends[s]; ++i) REQUIRE(codes[i] == fp8_e4m3_encode(expected[i] / scales[s]));
      begin = ends[s];
    }
    // The device half decodes with the segment's scale and adds the perturbation.
    std::vector<float> compute(n), z(n);
    zo_normals({21, 3}, 0, z.data(), n);
    zo_perturb_transfer(transfer, compute.data(), DType::kF32, {{21, 3}, 1e-3f});
    begin = 0;
    for (std::size_t s = 0; s < ends.size(); ++s) {
      for (std::int64_t i = begin; i < ends[s]; ++i) {
        REQUIRE(compute[i] == fp8_e4m3_decode(codes[i]) * scales[s] + 1e-3f * z[i]);
      }
      begin = ends[s];
    }
  }
}

TEST_CASE("compressed transfers reject copies that do not describe the part") {
  std::vector<float> weights(100), compute(100);
  std::vector<std::uint8_t> codes(100);
  std::vector<float> scales(2);
  const std::vector<std::int64_t> short_ends = {50, 90};
  ZoTensors stored{weights.data(), DType::kF32, nullptr, nullptr, nullptr, DType::kF32, 100};
  ZoTransferCopy transfer{ZoTransferFormat::kFp8E4M3, codes.data(), scales.data(), short_ends.data(), 2, 100};
  CHECK_THROWS_WITH(zo_update_and_encode(stored, nullptr, 0, transfer),
                    Catch::Contains("the last must end at 100"));
  transfer.numel = 99;
  CHECK_THROWS_WITH(zo_update_and_encode(stored, nullptr, 0, transfer),
                    Catch::Contains("needs codes for as many; got 99"));
  ZoTensors with_compute = stored;
  with_compute.compute = compute.data();
  CHECK_THROWS_WITH(zo_update_and_encode(with_compute, nullptr, 0, transfer),
                    Catch::Contains("not a compute copy"));
}
