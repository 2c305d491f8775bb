// Held-out evaluation over a loader's single pass: each batch's mean loss weighted by the tokens it
// learns, so the result is the mean over tokens whatever the batches' shapes.

#include <cmath>
#include <limits>

#include "ferry/check.h"
#include "ferry/engine.h"

namespace ferry {
namespace {

// The labels the loss counts: labels[:, 1:] that are not ignored (the loss shifts by one).
std::int64_t learned_tokens(const data::Batch& batch) {
  const std::int64_t columns = batch.labels.size(1);
  if (columns < 2) return 0;
  return batch.labels.slice(1, 1, columns).ne(kIgnoreIndex).sum().item<std::int64_t>();
}

struct Sum {
  double loss = 0;
  EvaluationResult result;
  void add(Engine& engine, const data::Batch& batch) {
    data::check_batch(batch, engine.vocab_size());  // before counting, which reads the labels' shape
    const std::int64_t tokens = learned_tokens(batch);
    ++result.batches;
    if (tokens == 0) return;
    loss += engine.evaluate(batch) * static_cast<double>(tokens);
    result.tokens += tokens;
  }
  EvaluationResult finish() {
    result.loss = result.tokens > 0 ? loss / static_cast<double>(result.tokens) : std::numeric_limits<double>::quiet_NaN();
    result.perplexity = std::exp(result.loss);
    return result;
  }
};

}  // namespace

EvaluationResult evaluate(Engine& engine, data::DataLoader& loader) {
  FERRY_CHECK(loader.options().single_pass, "evaluate() needs a loader with single_pass = true, or it never ends");
  FERRY_CHECK(!loader.finished(), "evaluate(): the loader's single pass is over already: give a new loader for each "
              "evaluation");
  Sum sum;
  while (!loader.finished()) sum.add(engine, loader.next());
  return sum.finish();
}

EvaluationResult evaluate(Engine& engine, const std::vector<data::Batch>& batches) {
  Sum sum;
  for (const data::Batch& batch : batches) sum.add(engine, batch);
  return sum.finish();
}

}  // namespace ferry
