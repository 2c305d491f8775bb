// Packed rows: documents that share a row see only themselves, with positions from their own start.

#include "support/catch.h"

#include <torch/torch.h>

#include "ferry/data.h"
#include "ferry/model.h"

using namespace ferry;

TEST_CASE("each document of a packed row gets the logits it gets alone") {
  const std::string preset = GENERATE("tiny-gpt2", "tiny-opt", "tiny-llama", "tiny-mistral", "tiny-qwen2");
  INFO(preset);
  const models::ModelConfig shape = models::preset(preset);
  LayeredModel model = models::build(shape, 5);
  torch::manual_seed(1);
  const torch::Tensor first = torch::randint(0, shape.vocab_size, {1, 5}, torch::kLong);
  const torch::Tensor second = torch::randint(0, shape.vocab_size, {1, 7}, torch::kLong);
  const torch::Tensor packed = torch::cat({first, second}, 1);
  const torch::Tensor positions = torch::cat({torch::arange(5), torch::arange(7)}).unsqueeze(0);
  torch::NoGradGuard no_grad;
  const torch::Tensor together = model.forward(packed, {}, positions);
  CHECK(torch::allclose(together.narrow(1, 0, 5), model.forward(first), 1e-5, 1e-5));
  CHECK(torch::allclose(together.narrow(1, 5, 7), model.forward(second), 1e-5, 1e-5));
  // Without the positions the second document sees the first one.
  CHECK_FALSE(torch::allclose(model.forward(packed).narrow(1, 5, 7), model.forward(second), 1e-3, 1e-3));
}

TEST_CASE("the loader's packed batches make a block-diagonal causal mask") {
  const models::ModelConfig shape = models::preset("tiny-llama");
  LayeredModel model = models::build(shape, 5);
  data::LoaderOptions options;
  options.batch_size = 1;
  options.sequence_length = 8;
  options.shuffle = false;
  const auto dataset = data::make_dataset("two", {{{1, 2, 3}, 0, {}}, {{4, 5, 6, 7, 8}, 0, {}}});
  data::DataLoader loader(dataset, options);
  const data::Batch batch = loader.next();
  CHECK(torch::equal(batch.position_ids[0], torch::tensor({0, 1, 2, 0, 1, 2, 3, 4}, torch::kLong)));
  const StepContext context = model.make_context(batch.input_ids, batch.attention_mask, batch.position_ids);
  REQUIRE(context.attention_mask.defined());
  const torch::Tensor allowed = context.attention_mask[0][0];
  CHECK(allowed[2][0].item<bool>());
  CHECK_FALSE(allowed[3][2].item<bool>());  // the second document's first token sees only itself
  CHECK(allowed[3][3].item<bool>());
  CHECK(allowed[7][3].item<bool>());
  CHECK_FALSE(allowed[7][0].item<bool>());
  CHECK_FALSE(allowed[1][2].item<bool>());  // and nothing after it
  // RoPE angles count from each document's start.
  CHECK(context.rope_cos.dim() == 3);
  CHECK(torch::equal(context.rope_cos[0][3], context.rope_cos[0][0]));
  // Rows of plain 0, 1, 2, ... keep the ordinary causal path.
  const StepContext plain = model.make_context(batch.input_ids, {}, torch::arange(8).unsqueeze(0));
  CHECK_FALSE(plain.attention_mask.defined());
  CHECK(plain.rope_cos.dim() == 2);
}
