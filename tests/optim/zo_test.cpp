// The zeroth-order kernels: the regenerated directions and the fused update-and-perturb pass.

#include <cmath>
#include <vector>

#include <catch2/catch.hpp>

#include "ferry/zo.h"

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
