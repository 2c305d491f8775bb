// Engine checkpoints go one part at a time: saving asks for each part's values in order and has
// let go of the previous part's before it asks for the next; loading checks every header before
// it hands over the first part. Round trips through Engine::save/load are in engine_test.cpp and
// zo2_test.cpp.

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "engine/checkpoint.h"
#include "engine/parts.h"
#include "ferry/model.h"
#include "ferry/safetensors.h"
#include "support/temp_dir.h"

// glog, which LibTorch includes, defines a CHECK macro of its own; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

using namespace ferry;
using ferry::testing::TempDir;

namespace {

LayeredModel tiny_model() { return models::build(models::preset("tiny-llama"), 7); }

ferry::detail::PartValues random_values(const ferry::detail::Part& part, std::size_t state_count) {
  ferry::detail::PartValues values{torch::randn({part.numel}), {}};
  for (std::size_t i = 0; i < state_count; ++i) {
    values.states.push_back(torch::rand({part.numel}));
  }
  return values;
}

// Bytes of the values handed out that someone besides `given` still holds.
std::int64_t held_elsewhere_bytes(const std::vector<ferry::detail::PartValues>& given) {
  std::int64_t bytes = 0;
  auto count = [&](const torch::Tensor& tensor) {
    if (tensor.use_count() > 1) bytes += tensor.numel() * 4;
  };
  for (const ferry::detail::PartValues& values : given) {
    count(values.weights);
    for (const torch::Tensor& state : values.states) count(state);
  }
  return bytes;
}

}  // namespace

TEST_CASE("saving holds one part's values at a time and loading hands them back in order") {
  const LayeredModel model = tiny_model();
  const std::vector<ferry::detail::Part> parts = ferry::detail::describe_parts(model);
  REQUIRE(parts.size() > 2);
  TempDir dir;
  const std::string checkpoint = dir.file("ckpt");

  std::vector<ferry::detail::PartValues> given;  // copies of what the producer handed out
  ferry::detail::write_checkpoint(checkpoint, model, parts, OptimizerKind::kAdamW, 2, {{"step", 3}},
                           [&](std::size_t p) {
                             INFO("part " << p);
                             CHECK(p == given.size());  // in order, once each
                             CHECK(held_elsewhere_bytes(given) == 0);  // the last part let go
                             given.push_back(random_values(parts[p], 2));
                             return given.back();
                           });
  CHECK(given.size() == parts.size());
  CHECK(held_elsewhere_bytes(given) == 0);

  std::size_t tensors = 0;
  for (const ferry::detail::Part& part : parts) tensors += part.slices.size();
  CHECK(safetensors::Checkpoint(checkpoint).names().size() == tensors);
  CHECK(safetensors::Reader(checkpoint + "/optimizer.safetensors").header().tensors.size() ==
        2 * tensors);

  // Every tensor read is checked against the XXH64 trainer_state.json records for it.
  std::ifstream state_file(checkpoint + "/trainer_state.json");
  const nlohmann::json state = nlohmann::json::parse(state_file);
  REQUIRE(state.contains("checksums"));
  std::size_t next = 0;
  ferry::detail::read_checkpoint(checkpoint, model, parts, OptimizerKind::kAdamW, 2, state["checksums"],
                                 Verify::kFull, [&](std::size_t p, ferry::detail::PartValues values) {
                            INFO("part " << p);
                            REQUIRE(p == next++);
                            CHECK(torch::equal(values.weights, given[p].weights));
                            REQUIRE(values.states.size() == 2);
                            CHECK(torch::equal(values.states[0], given[p].states[0]));
                            CHECK(torch::equal(values.states[1], given[p].states[1]));
                          });
  CHECK(next == parts.size());
}

TEST_CASE("loading checks the whole checkpoint before it hands over a part") {
  const LayeredModel model = tiny_model();
  std::vector<ferry::detail::Part> parts = ferry::detail::describe_parts(model);
  TempDir dir;
  const std::string checkpoint = dir.file("ckpt");
  ferry::detail::write_checkpoint(checkpoint, model, parts, OptimizerKind::kSgd, 1, {{"step", 1}},
                           [&](std::size_t p) { return random_values(parts[p], 1); });

  std::size_t handed_over = 0;
  auto consume = [&](std::size_t, ferry::detail::PartValues) { ++handed_over; };
  SECTION("optimizer states of another optimizer") {
    CHECK_THROWS_WITH(
        ferry::detail::read_checkpoint(checkpoint, model, parts, OptimizerKind::kAdamW, 2, nlohmann::json(),
                                       Verify::kFull, consume),
        Catch::Contains("has no tensor '") &&
            Catch::Contains(".exp_avg' in optimizer.safetensors"));
  }
  SECTION("a shape that differs in the last part") {
    ferry::detail::ParameterSlice& slice = parts.back().slices.back();
    slice.shape.push_back(1);
    CHECK_THROWS_WITH(
        ferry::detail::read_checkpoint(checkpoint, model, parts, OptimizerKind::kSgd, 1, nlohmann::json(),
                                       Verify::kFull, consume),
        Catch::Contains("but the model has F32") && Catch::Contains("another model"));
  }
  SECTION("a tensor missing from the last part") {
    parts.back().slices.back().name = "extra.weight";
    CHECK_THROWS_WITH(
        ferry::detail::read_checkpoint(checkpoint, model, parts, OptimizerKind::kSgd, 1, nlohmann::json(),
                                       Verify::kFull, consume),
        Catch::Contains("has no tensor '") && Catch::Contains("in the weights"));
  }
  CHECK(handed_over == 0);
}
