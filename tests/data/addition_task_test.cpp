#include "support/catch.h"

#include <ATen/ops/zeros.h>

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "ferry/check.h"
#include "ferry/data.h"

namespace {

using ferry::data::AdditionTask;
using ferry::data::ByteTokenizer;
using ferry::data::PromptCompletion;
using ferry::data::Split;
using Catch::Matchers::Contains;

std::set<std::string> prompts_of(const std::vector<PromptCompletion>& problems) {
  std::set<std::string> prompts;
  for (const PromptCompletion& problem : problems) {
    prompts.insert(problem.prompt);
  }
  return prompts;
}

// Reads "a+b=" back from the prompt tokens and answers a + b + error, one digit wider than
// a, then EOS.
ferry::data::GenerateFn oracle(int64_t error) {
  return [error](const std::vector<int64_t>& prompt, int64_t max_new_tokens) {
    REQUIRE(prompt.front() == ByteTokenizer::kBos);
    std::string text = ByteTokenizer().decode(prompt);
    size_t plus = text.find('+');
    int64_t sum = std::stoll(text.substr(0, plus)) + std::stoll(text.substr(plus + 1)) + error;
    std::string digits = std::to_string(sum);
    digits.insert(0, plus + 1 - digits.size(), '0');
    std::vector<int64_t> answer = ByteTokenizer().encode(digits);
    answer.push_back(ByteTokenizer::kEos);
    return answer;
  };
}

}  // namespace

TEST_CASE("addition problems are correct sums written to a fixed width") {
  AdditionTask task{3, 4};
  std::set<int64_t> sum_lengths;
  for (const PromptCompletion& problem : ferry::data::addition_problems(task, Split::kTrain, 500)) {
    REQUIRE(problem.prompt.size() == 8);
    REQUIRE(problem.prompt[3] == '+');
    REQUIRE(problem.prompt[7] == '=');
    int64_t a = std::stoll(problem.prompt.substr(0, 3));
    int64_t b = std::stoll(problem.prompt.substr(4, 3));
    REQUIRE(problem.completion.size() == 4);
    CHECK(std::stoll(problem.completion) == a + b);
    sum_lengths.insert(std::to_string(a + b).size());
  }
  // Short numbers are as likely as long ones, so every length of sum occurs.
  CHECK(sum_lengths == std::set<int64_t>{1, 2, 3, 4});
  CHECK(ferry::data::addition_problems({1, 0}, Split::kTrain, 1).front().prompt.size() == 4);
}

TEST_CASE("addition problems follow the seed and the split") {
  AdditionTask task{2, 1};
  auto train = ferry::data::addition_problems(task, Split::kTrain, 300);
  auto again = ferry::data::addition_problems(task, Split::kTrain, 300);
  auto eval = ferry::data::addition_problems(task, Split::kEval, 100);
  auto other_seed = ferry::data::addition_problems({2, 2}, Split::kTrain, 300);
  CHECK(prompts_of(train) == prompts_of(again));
  CHECK(train.front().prompt == again.front().prompt);
  CHECK(prompts_of(train) != prompts_of(other_seed));
  std::set<std::string> train_prompts = prompts_of(train);
  for (const std::string& prompt : prompts_of(eval)) {
    CHECK(train_prompts.count(prompt) == 0);
  }
  CHECK(ferry::data::addition_problems(task, Split::kTrain, 0).empty());
  CHECK_THROWS_WITH(ferry::data::addition_problems({0, 1}, Split::kTrain, 1),
                    Contains("max_digits is 0") && Contains("1 to 9"));
}

TEST_CASE("the addition dataset is byte-tokenized with the prompt marked") {
  AdditionTask task{3, 0};
  auto problems = ferry::data::addition_problems(task, Split::kEval, 50);
  auto dataset = ferry::data::addition_dataset(task, Split::kEval, 50);
  REQUIRE(dataset->size() == 50);
  for (int64_t i = 0; i < dataset->size(); ++i) {
    ferry::data::Example example = dataset->get(i);
    ferry::data::Example expected = ByteTokenizer().encode_prompt_completion(
        problems[i].prompt, problems[i].completion);
    CHECK(example.tokens == expected.tokens);
    CHECK(example.prompt_tokens == expected.prompt_tokens);
    CHECK(example.tokens.size() == 14);
  }
  CHECK_THAT(dataset->name(), Contains("addition") && Contains("eval"));
}

TEST_CASE("exact-match accuracy is 1 for the right answers and 0 for wrong ones") {
  auto problems = ferry::data::addition_problems({2, 3}, Split::kEval, 40);
  CHECK(ferry::data::exact_match_accuracy(problems, oracle(0)) == 1.0);
  CHECK(ferry::data::exact_match_accuracy(problems, oracle(1)) == 0.0);

  int64_t calls = 0;
  auto right_every_other_call = [&](const std::vector<int64_t>& prompt, int64_t max_new_tokens) {
    return oracle(calls++ % 2)(prompt, max_new_tokens);
  };
  CHECK(ferry::data::exact_match_accuracy(problems, right_every_other_call) == 0.5);

  auto without_eos = [](const std::vector<int64_t>& prompt, int64_t max_new_tokens) {
    std::vector<int64_t> answer = oracle(0)(prompt, max_new_tokens);
    answer.pop_back();
    return answer;
  };
  CHECK(ferry::data::exact_match_accuracy(problems, without_eos) == 1.0);

  auto without_last_digit = [](const std::vector<int64_t>& prompt, int64_t max_new_tokens) {
    std::vector<int64_t> answer = oracle(0)(prompt, max_new_tokens);
    answer.erase(answer.end() - 2);
    return answer;
  };
  CHECK(ferry::data::exact_match_accuracy(problems, without_last_digit) == 0.0);

  auto too_many = [](const std::vector<int64_t>&, int64_t max_new_tokens) {
    return std::vector<int64_t>(max_new_tokens + 1, '1');
  };
  CHECK_THROWS_WITH(ferry::data::exact_match_accuracy(problems, too_many),
                    Contains("more than the"));
}

TEST_CASE("batched exact-match accuracy answers every prompt once, in order") {
  auto problems = ferry::data::addition_problems({2, 3}, Split::kEval, 40);
  std::vector<int64_t> batch_sizes;
  auto batched = [&](const std::vector<std::vector<int64_t>>& prompts, int64_t max_new_tokens) {
    batch_sizes.push_back(static_cast<int64_t>(prompts.size()));
    std::vector<std::vector<int64_t>> answers;
    for (const auto& prompt : prompts) {
      answers.push_back(oracle(0)(prompt, max_new_tokens));
    }
    return answers;
  };
  CHECK(ferry::data::exact_match_accuracy(problems, batched, 7) == 1.0);
  CHECK(batch_sizes == std::vector<int64_t>{7, 7, 7, 7, 7, 5});

  auto one_answer_short = [&](const std::vector<std::vector<int64_t>>& prompts,
                              int64_t max_new_tokens) {
    auto answers = batched(prompts, max_new_tokens);
    answers.pop_back();
    return answers;
  };
  CHECK_THROWS_WITH(ferry::data::exact_match_accuracy(problems, one_answer_short, 4),
                    Contains("3 answers for 4 prompts"));
  CHECK_THROWS_WITH(ferry::data::exact_match_accuracy(problems, batched, 0),
                    Contains("batch_size is 0"));
}

TEST_CASE("teacher-forced accuracy compares logits at t - 1 with labels at t") {
  constexpr int64_t kIgnore = ferry::data::kIgnoreIndex;
  // Two rows of four positions; row 0 learns positions 2 and 3, row 1 learns position 3.
  at::Tensor labels = at::zeros({2, 4}, at::kLong);
  std::vector<std::vector<int64_t>> label_rows = {{kIgnore, kIgnore, 3, 1},
                                                  {kIgnore, kIgnore, kIgnore, 2}};
  for (int64_t row = 0; row < 2; ++row) {
    for (int64_t column = 0; column < 4; ++column) {
      labels.data_ptr<int64_t>()[row * 4 + column] = label_rows[row][column];
    }
  }
  at::Tensor logits = at::zeros({2, 4, 5}, at::kFloat);
  auto predict = [&](int64_t row, int64_t column, int64_t token) {
    logits.data_ptr<float>()[(row * 4 + column) * 5 + token] = 1.0f;
  };
  predict(0, 1, 3);
  predict(0, 2, 1);
  predict(1, 2, 2);
  predict(1, 3, 4);  // the last position predicts nothing that is scored

  auto perfect = ferry::data::teacher_forced_accuracy(logits, labels);
  CHECK(perfect.answer_tokens == 3);
  CHECK(perfect.answer_rows == 2);
  CHECK(perfect.token_accuracy == 1.0);
  CHECK(perfect.row_accuracy == 1.0);

  predict(0, 2, 4);
  logits.data_ptr<float>()[(0 * 4 + 2) * 5 + 1] = 0.0f;
  auto one_wrong = ferry::data::teacher_forced_accuracy(logits, labels);
  CHECK(one_wrong.token_accuracy == Approx(2.0 / 3.0));
  CHECK(one_wrong.row_accuracy == 0.5);

  CHECK_THROWS_WITH(ferry::data::teacher_forced_accuracy(logits, labels.slice(1, 0, 3)),
                    Contains("labels must be [batch, sequence]"));
}
