#pragma once

// What the engine tests share: the demo task's loader, a base configuration, and the comparison
// of two runs' steps. Include after <catch2/catch.hpp>.

#include <cmath>
#include <memory>
#include <string>
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

// A part's placement: its parameters on one tier, its gradients, master, states and accumulator
// on another.
inline PartPlacement everything_on(Tier params, Tier rest) {
  PartPlacement home;
  home.params = params;
  home.grads = home.master = home.states[0] = home.states[1] = home.accumulator = rest;
  return home;
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

// The losses of `steps` steps of the demo task (loader seed 3), saving a checkpoint with the
// loader's position into `checkpoint` after step `save_after`.
inline std::vector<double> losses_saving_at(Engine& engine, int steps, int save_after,
                                            const std::string& checkpoint) {
  auto loader = demo_loader(3);
  std::vector<double> losses;
  for (int i = 0; i < steps; ++i) {
    losses.push_back(engine.train_step(loader->next())->loss);
    if (i + 1 == save_after) engine.save(checkpoint, loader->state().to_json());
  }
  return losses;
}

// Loads that checkpoint into `resumed` and requires the rest of `uninterrupted`'s losses.
inline void require_resumed_losses(Engine& resumed, const std::string& checkpoint, int save_after,
                                   const std::vector<double>& uninterrupted) {
  auto loader = demo_loader(3);
  loader->restore(data::LoaderState::from_json(resumed.load(checkpoint)));
  CHECK(resumed.steps_taken() == save_after);
  for (std::size_t i = static_cast<std::size_t>(save_after); i < uninterrupted.size(); ++i) {
    INFO("step " << i + 1);
    CHECK(resumed.train_step(loader->next())->loss == uninterrupted[i]);
  }
}

}  // namespace ferry::testing
