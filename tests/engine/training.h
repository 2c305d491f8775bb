#pragma once

// What the engine tests share: the demo task's loader, a base configuration, and the comparison
// of two runs' steps. Include after <catch2/catch.hpp>.

#include <cmath>
#include <memory>
#include <vector>

#include "ferry/data.h"
#include "ferry/engine.h"

namespace ferry::testing {

constexpr std::int64_t kDemoSequence = 24;

// The addition task, one answer per sequence, in a seeded order.
inline std::unique_ptr<data::DataLoader> demo_loader(std::uint64_t seed, std::int64_t batch = 4) {
  data::LoaderOptions options;
  options.batch_size = batch;
  options.sequence_length = kDemoSequence;
  options.pack = false;
  options.answer_only = true;
  options.seed = seed;
  return std::make_unique<data::DataLoader>(
      data::addition_dataset({2, seed}, data::Split::kTrain, 512), options);
}

inline EngineConfig base_config(Mode mode) {
  EngineConfig config;
  config.mode = mode;
  config.optimizer.lr = 3e-3;
  config.optimizer.weight_decay = 0.01;
  return config;
}

// Losses, skips and gradient norms equal, step by step.
inline void require_same_steps(const std::vector<StepResult>& a, const std::vector<StepResult>& b) {
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    INFO("step " << i + 1);
    CHECK(a[i].loss == b[i].loss);
    CHECK(a[i].skipped == b[i].skipped);
    if (!std::isnan(a[i].grad_norm)) CHECK(a[i].grad_norm == b[i].grad_norm);
  }
}

}  // namespace ferry::testing
