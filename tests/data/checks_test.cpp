#include "support/catch.h"

#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>

#include <cstdint>

#include "ferry/check.h"
#include "ferry/data.h"

namespace {

using ferry::data::Batch;
using ferry::data::check_batch;
using Catch::Matchers::Contains;

// Two rows of four tokens from a padding loader: what the engine is handed every step.
Batch loader_batch() {
  ferry::data::LoaderOptions options;
  options.batch_size = 2;
  options.sequence_length = 4;
  options.pack = false;
  options.shuffle = false;
  options.answer_only = true;
  options.vocab_size = 10;
  options.pad_token = 0;
  ferry::data::DataLoader loader(ferry::data::make_dataset("two", {{{1, 2, 3}, 1, {}}, {{4, 5, 6, 7}, 2, {}}}), options);
  return loader.next();
}

}  // namespace

TEST_CASE("a loader's batch passes the checks, with or without a vocabulary") {
  const Batch batch = loader_batch();
  CHECK_NOTHROW(check_batch(batch, 10));
  CHECK_NOTHROW(check_batch(batch));
  Batch bare = batch;
  bare.attention_mask = at::Tensor();
  bare.position_ids = at::Tensor();
  CHECK_NOTHROW(check_batch(bare, 10));
  bare.attention_mask = batch.attention_mask.to(at::kBool);
  bare.input_ids = batch.input_ids.to(at::kInt);
  CHECK_NOTHROW(check_batch(bare, 10));
}

TEST_CASE("ids outside the vocabulary are named with their place and the valid range") {
  Batch batch = loader_batch();
  batch.input_ids[1][2] = 10;
  CHECK_THROWS_WITH(check_batch(batch, 10), Contains("input_ids[1, 2] is 10") &&
                                                Contains("valid token ids are 0 to 9 (vocab_size 10)"));
  batch.input_ids[0][3] = -1;
  CHECK_THROWS_WITH(check_batch(batch), Contains("input_ids[0, 3] is -1") && Contains("0 and above"));
  batch = loader_batch();
  batch.labels[0][1] = 12;
  CHECK_THROWS_WITH(check_batch(batch, 10), Contains("labels[0, 1] is 12") && Contains("-100 (not learned)") &&
                                                Contains("0 to 9"));
  batch.labels[0][1] = -5;
  CHECK_THROWS_WITH(check_batch(batch), Contains("labels[0, 1] is -5"));
}

TEST_CASE("a batch of the wrong dtype, rank or size names the tensor and what it must be") {
  Batch batch = loader_batch();
  batch.input_ids = batch.input_ids.to(at::kFloat);
  CHECK_THROWS_WITH(check_batch(batch), Contains("input_ids is torch.float32") && Contains("integer tensor"));
  batch = loader_batch();
  batch.input_ids = batch.input_ids.flatten();
  CHECK_THROWS_WITH(check_batch(batch), Contains("input_ids has shape [8]") && Contains("[batch, seq]"));
  batch = loader_batch();
  batch.input_ids = at::zeros({0, 4}, at::kLong);
  CHECK_THROWS_WITH(check_batch(batch), Contains("input_ids has shape [0, 4]") && Contains("at least one row"));
  batch = loader_batch();
  batch.labels = at::Tensor();
  CHECK_THROWS_WITH(check_batch(batch), Contains("labels is missing"));
  batch = loader_batch();
  batch.labels = batch.labels.narrow(1, 1, 3);
  CHECK_THROWS_WITH(check_batch(batch), Contains("labels has shape [2, 3] but input_ids [2, 4]"));
  batch = loader_batch();
  batch.labels = batch.labels.to(at::kDouble);
  CHECK_THROWS_WITH(check_batch(batch), Contains("labels is torch.float64"));
}

TEST_CASE("a mask or positions that do not go with input_ids are refused") {
  Batch batch = loader_batch();
  batch.attention_mask = at::ones({2, 1, 4, 4}, at::kLong);
  CHECK_THROWS_WITH(check_batch(batch), Contains("attention_mask has shape [2, 1, 4, 4] but input_ids [2, 4]"));
  batch = loader_batch();
  batch.attention_mask = at::full({2, 4}, 0.5, at::kFloat);
  CHECK_THROWS_WITH(check_batch(batch), Contains("attention_mask[0, 0] is 0.5") && Contains("1 (a real token)"));
  batch = loader_batch();
  batch.position_ids = batch.position_ids.to(at::kFloat);
  CHECK_THROWS_WITH(check_batch(batch), Contains("position_ids is torch.float32"));
  batch = loader_batch();
  batch.position_ids[1][0] = -1;
  CHECK_THROWS_WITH(check_batch(batch), Contains("position_ids[1, 0] is -1"));
}

TEST_CASE("check_token_ids names the tensor it is given") {
  CHECK_THROWS_WITH(ferry::data::check_token_ids(at::full({1, 3}, 7, at::kLong), "tokens", 5),
                    Contains("tokens[0, 0] is 7") && Contains("0 to 4"));
}
