// Held-out evaluation against the same loss computed in the test, over batches written out here.

#include <torch/torch.h>

#include "ferry/data.h"
#include "ferry/engine.h"
#include "ferry/model.h"
#include "ferry/tokenizer.h"

// glog, which LibTorch includes, defines a CHECK macro of its own; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

#include "engine/training.h"

using namespace ferry;

TEST_CASE("evaluate is the mean loss over every learned token of a single pass") {
  const models::ModelConfig shape = models::preset("tiny-llama");
  // Five examples of the byte tokenizer, one with a prompt, one longer than a row (cut).
  std::vector<data::Example> examples;
  for (const char* text : {"short", "a little longer text", "x", "the longest text of them all, cut to the row"}) {
    examples.push_back(data::encode_document(*byte_tokenizer(), text));
  }
  examples.push_back(data::encode_prompt_completion(*byte_tokenizer(), "2+2=", "4"));
  data::LoaderOptions options;
  options.batch_size = 2;
  options.sequence_length = 16;
  options.pack = false;
  options.answer_only = true;
  options.shuffle = false;
  options.single_pass = true;
  data::DataLoader loader(data::make_dataset("held out", examples), options);

  EngineConfig config = testing::base_config(Mode::kZeroOffload);
  Engine engine(models::build(shape, 21), config);
  const EvaluationResult result = evaluate(engine, loader);
  CHECK(result.batches == 3);

  // The same, written out: each example in its own row, cut to 16 tokens and padded; the loss
  // of every learned label summed and divided by their number.
  LayeredModel reference = models::build(shape, 21);
  double loss_sum = 0;
  std::int64_t counted = 0;
  for (const data::Example& example : examples) {
    const std::int64_t length = std::min<std::int64_t>(16, static_cast<std::int64_t>(example.tokens.size()));
    torch::Tensor tokens = torch::full({1, 16}, data::ByteTokenizer::kPad, torch::kLong);
    torch::Tensor mask = torch::zeros({1, 16}, torch::kLong);
    torch::Tensor labels = torch::full({1, 16}, kIgnoreIndex, torch::kLong);
    for (std::int64_t t = 0; t < length; ++t) {
      tokens[0][t] = example.tokens[t];
      mask[0][t] = 1;
      if (t >= example.prompt_tokens) labels[0][t] = example.tokens[t];
    }
    torch::NoGradGuard no_grad;
    const torch::Tensor logits = reference.forward(tokens, mask).to(torch::kFloat);
    const torch::Tensor targets = labels.narrow(1, 1, 15).reshape({-1});
    loss_sum += torch::nn::functional::cross_entropy(
                    logits.narrow(1, 0, 15).reshape({-1, shape.vocab_size}), targets,
                    torch::nn::functional::CrossEntropyFuncOptions().ignore_index(kIgnoreIndex).reduction(torch::kSum))
                    .item<double>();
    counted += targets.ne(kIgnoreIndex).sum().item<std::int64_t>();
  }
  CHECK(result.tokens == counted);
  CHECK(result.loss == Approx(loss_sum / counted).epsilon(1e-5));
  CHECK(result.perplexity == Approx(std::exp(loss_sum / counted)).epsilon(1e-5));
  CHECK_THROWS_WITH(evaluate(engine, loader), Catch::Contains("single pass"));
  data::LoaderOptions endless = options;
  endless.single_pass = false;
  data::DataLoader forever(data::make_dataset("held out", examples), endless);
  CHECK_THROWS_WITH(evaluate(engine, forever), Catch::Contains("single_pass"));
}
