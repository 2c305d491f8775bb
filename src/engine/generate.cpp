// Decoding with sampling: greedy, or temperature, top-k and top-p (nucleus) sampling as
// transformers' generate applies them (temperature, then top-k, then top-p on what remains).

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <limits>

#include "ferry/check.h"
#include "ferry/engine.h"

namespace ferry {
namespace {

std::int64_t sample(const torch::Tensor& logits, const GenerationOptions& options, at::Generator& generator) {
  if (options.temperature <= 0) return logits.argmax().item<std::int64_t>();
  torch::Tensor scaled = logits.to(torch::kCPU, torch::kFloat) / options.temperature;
  if (options.top_k > 0 && options.top_k < scaled.size(0)) {
    const torch::Tensor kth = std::get<0>(scaled.topk(options.top_k)).min();
    scaled = scaled.masked_fill(scaled < kth, -std::numeric_limits<float>::infinity());
  }
  if (options.top_p < 1) {
    auto [sorted, order] = scaled.sort(/*dim=*/0, /*descending=*/true);
    const torch::Tensor cumulative = sorted.softmax(0).cumsum(0);
    // Drop a token once the ones before it already reach top_p; the most likely always stays.
    torch::Tensor drop = (cumulative - sorted.softmax(0)) >= options.top_p;
    drop[0] = false;
    scaled = scaled.index_fill(0, order.masked_select(drop), -std::numeric_limits<float>::infinity());
  }
  return at::multinomial(scaled.softmax(0), 1, /*replacement=*/false, generator).item<std::int64_t>();
}

}  // namespace

std::vector<std::int64_t> generate(Engine& engine, const std::vector<std::int64_t>& prompt,
                                   const GenerationOptions& options) {
  FERRY_CHECK(!prompt.empty(), "generate() needs a prompt of at least one token");
  FERRY_CHECK(options.max_new_tokens >= 0, "max_new_tokens is ", options.max_new_tokens, ": it must be 0 or more");
  FERRY_CHECK(options.temperature >= 0, "temperature is ", options.temperature, ": it must be 0 (greedy) or more");
  FERRY_CHECK(options.top_p > 0 && options.top_p <= 1, "top_p is ", options.top_p, ": valid are 0 < top_p <= 1");
  FERRY_CHECK(options.top_k >= 0, "top_k is ", options.top_k, ": it must be 0 (all tokens) or more");
  FERRY_CHECK(options.vocab_size >= 0, "vocab_size is ", options.vocab_size, ": it must be 0 (every id) or more");
  at::Generator generator = at::detail::createCPUGenerator(options.seed);
  std::vector<std::int64_t> sequence = prompt;
  std::vector<std::int64_t> generated;
  for (std::int64_t i = 0; i < options.max_new_tokens; ++i) {
    torch::Tensor tokens = at::tensor(sequence, at::kLong).unsqueeze(0);
    torch::Tensor logits = engine.logits(tokens);
    torch::Tensor last = logits[0][logits.size(1) - 1];
    if (options.vocab_size > 0 && options.vocab_size < last.size(0)) last = last.narrow(0, 0, options.vocab_size);
    const std::int64_t next = sample(last, options, generator);
    if (std::find(options.stop_ids.begin(), options.stop_ids.end(), next) != options.stop_ids.end()) break;
    generated.push_back(next);
    sequence.push_back(next);
  }
  return generated;
}

}  // namespace ferry
