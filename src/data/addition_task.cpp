#include "data/shuffle.h"
#include "ferry/check.h"
#include "ferry/data.h"

namespace ferry::data {
namespace {

int64_t power_of_ten(int64_t exponent) {
  int64_t value = 1;
  for (int64_t i = 0; i < exponent; ++i) {
    value *= 10;
  }
  return value;
}

// The digit count first, then the number: otherwise nine in ten numbers would have the most
// digits and the short problems a model learns first would be rare.
int64_t random_number(SplitMix64& rng, int64_t max_digits) {
  int64_t digits = 1 + static_cast<int64_t>(rng.below(max_digits));
  int64_t smallest = digits == 1 ? 0 : power_of_ten(digits - 1);
  return smallest + static_cast<int64_t>(rng.below(power_of_ten(digits) - smallest));
}

Split split_of(int64_t a, int64_t b, uint64_t seed) {
  uint64_t hash = SplitMix64(SplitMix64(seed).next() + static_cast<uint64_t>(a)).next();
  hash = SplitMix64(hash + static_cast<uint64_t>(b)).next();
  return hash % 8 == 0 ? Split::kEval : Split::kTrain;
}

const char* split_name(Split split) { return split == Split::kTrain ? "train" : "eval"; }

std::string zero_padded(int64_t value, int64_t digits) {
  std::string text = std::to_string(value);
  return std::string(digits - static_cast<int64_t>(text.size()), '0') + text;
}

}  // namespace

std::vector<PromptCompletion> addition_problems(const AdditionTask& task, Split split,
                                                int64_t count) {
  FERRY_CHECK(task.max_digits >= 1 && task.max_digits <= 9, "addition task max_digits is ",
              task.max_digits, ": valid are 1 to 9");
  FERRY_CHECK(count >= 0, "addition task problem count is ", count, ": it must be 0 or more");
  SplitMix64 rng(SplitMix64(task.seed).next() + (split == Split::kTrain ? 1 : 2));
  std::vector<PromptCompletion> problems;
  problems.reserve(count);
  // Note: one problem in eight belongs to eval, so a draw is kept with probability 7/8 or
  // 1/8. Only with max_digits = 1 (100 problems) could a seed put none in a split; the bound
  // turns that into an error instead of an endless loop.
  const int64_t max_draws = 1000 * (count + 1);
  for (int64_t draws = 0; static_cast<int64_t>(problems.size()) < count; ++draws) {
    FERRY_CHECK(draws < max_draws, "addition task with max_digits ", task.max_digits,
                " and seed ", task.seed, " has no ", split_name(split),
                " problems: use another seed or more digits");
    int64_t a = random_number(rng, task.max_digits);
    int64_t b = random_number(rng, task.max_digits);
    if (split_of(a, b, task.seed) == split) {
      problems.push_back({zero_padded(a, task.max_digits) + "+" +
                              zero_padded(b, task.max_digits) + "=",
                          zero_padded(a + b, task.max_digits + 1)});
    }
  }
  return problems;
}

std::shared_ptr<const Dataset> addition_dataset(const AdditionTask& task, Split split,
                                                int64_t count) {
  ByteTokenizer tokenizer;
  std::vector<Example> examples;
  examples.reserve(count);
  for (const PromptCompletion& problem : addition_problems(task, split, count)) {
    examples.push_back(tokenizer.encode_prompt_completion(problem.prompt, problem.completion));
  }
  std::string name = "addition task (max_digits " + std::to_string(task.max_digits) + ", seed " +
                     std::to_string(task.seed) + ", " + split_name(split) + ")";
  return make_dataset(std::move(name), std::move(examples));
}

}  // namespace ferry::data
