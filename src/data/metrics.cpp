#include <ATen/ops/argmax.h>

#include <algorithm>

#include "ferry/check.h"
#include "ferry/data.h"

namespace ferry::data {

namespace {

int64_t answer_budget(const std::vector<PromptCompletion>& problems) {
  int64_t max_new_tokens = 0;
  for (const PromptCompletion& problem : problems) {
    max_new_tokens = std::max<int64_t>(max_new_tokens, problem.completion.size() + 1);
  }
  return max_new_tokens;
}

std::vector<int64_t> prompt_tokens(const PromptCompletion& problem) {
  std::vector<int64_t> prompt = ByteTokenizer().encode(problem.prompt);
  prompt.insert(prompt.begin(), ByteTokenizer::kBos);
  return prompt;
}

bool is_exact_match(std::vector<int64_t> answer, const PromptCompletion& problem,
                    int64_t max_new_tokens) {
  FERRY_CHECK(static_cast<int64_t>(answer.size()) <= max_new_tokens, "generate returned ",
              answer.size(), " tokens for prompt \"", problem.prompt, "\", more than the ",
              max_new_tokens, " asked for");
  answer.erase(std::find(answer.begin(), answer.end(), ByteTokenizer::kEos), answer.end());
  return answer == ByteTokenizer().encode(problem.completion);
}

}  // namespace

double exact_match_accuracy(const std::vector<PromptCompletion>& problems,
                            const GenerateFn& generate) {
  FERRY_CHECK(generate != nullptr, "exact_match_accuracy needs a generate function, got none");
  auto one_at_a_time = [&](const std::vector<std::vector<int64_t>>& prompts,
                           int64_t max_new_tokens) {
    return std::vector<std::vector<int64_t>>{generate(prompts.front(), max_new_tokens)};
  };
  return exact_match_accuracy(problems, one_at_a_time, 1);
}

double exact_match_accuracy(const std::vector<PromptCompletion>& problems,
                            const BatchGenerateFn& generate, int64_t batch_size) {
  FERRY_CHECK(!problems.empty(), "exact_match_accuracy needs at least one problem, got none");
  FERRY_CHECK(generate != nullptr, "exact_match_accuracy needs a generate function, got none");
  FERRY_CHECK(batch_size > 0, "exact_match_accuracy batch_size is ", batch_size,
              ": it must be at least 1");
  const int64_t count = static_cast<int64_t>(problems.size());
  const int64_t max_new_tokens = answer_budget(problems);
  int64_t matches = 0;
  for (int64_t begin = 0; begin < count; begin += batch_size) {
    int64_t end = std::min(begin + batch_size, count);
    std::vector<std::vector<int64_t>> prompts;
    for (int64_t i = begin; i < end; ++i) {
      prompts.push_back(prompt_tokens(problems[i]));
    }
    std::vector<std::vector<int64_t>> answers = generate(prompts, max_new_tokens);
    FERRY_CHECK(static_cast<int64_t>(answers.size()) == end - begin, "generate returned ",
                answers.size(), " answers for ", end - begin, " prompts");
    for (int64_t i = begin; i < end; ++i) {
      matches += is_exact_match(std::move(answers[i - begin]), problems[i], max_new_tokens);
    }
  }
  return static_cast<double>(matches) / static_cast<double>(count);
}

AnswerAccuracy teacher_forced_accuracy(const at::Tensor& logits, const at::Tensor& labels) {
  FERRY_CHECK(logits.dim() == 3, "logits must be [batch, sequence, vocab], got ",
              logits.sizes());
  FERRY_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) &&
                  labels.size(1) == logits.size(1),
              "labels must be [batch, sequence] matching logits ", logits.sizes(), ", got ",
              labels.sizes());
  const int64_t columns = logits.size(1);
  at::Tensor predicted = at::argmax(logits.slice(1, 0, columns - 1), -1);
  at::Tensor target = labels.to(predicted.device()).slice(1, 1, columns);
  at::Tensor learned = target.ne(kIgnoreIndex);
  at::Tensor wrong = predicted.ne(target).logical_and(learned);
  AnswerAccuracy accuracy;
  accuracy.answer_tokens = learned.sum().item<int64_t>();
  accuracy.answer_rows = learned.any(1).sum().item<int64_t>();
  if (accuracy.answer_tokens > 0) {
    int64_t right_tokens = accuracy.answer_tokens - wrong.sum().item<int64_t>();
    int64_t right_rows = learned.any(1).logical_and(wrong.any(1).logical_not()).sum()
                             .item<int64_t>();
    accuracy.token_accuracy = static_cast<double>(right_tokens) / accuracy.answer_tokens;
    accuracy.row_accuracy = static_cast<double>(right_rows) / accuracy.answer_rows;
  }
  return accuracy;
}

}  // namespace ferry::data
