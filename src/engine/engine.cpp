// The public Engine: forwards to the trainer that runs the configured mode (engine/trainer.h).

#include "ferry/engine.h"

#include <torch/torch.h>

#include "engine/data_parallel.h"
#include "engine/trainer.h"
#include "engine/update.h"
#include "ferry/check.h"

namespace ferry {

namespace {
// The trainer of the configured mode, on the model with the dropout setting applied.
std::unique_ptr<detail::Trainer> make_trainer(LayeredModel model, EngineConfig config) {
  if (config.dropout.rate) model.set_dropout(*config.dropout.rate);
  if (config.mode == Mode::kZo2) return detail::make_zo2_trainer(std::move(model), std::move(config));
  return detail::make_first_order_trainer(std::move(model), std::move(config));
}

// Read from the model as it is handed in: once a trainer holds it, an offloaded part's parameters
// are empty between visits.
std::optional<std::int64_t> model_vocab_size(const LayeredModel& model) {
  if (model.config()) return model.config()->vocab_size;
  const torch::Tensor embedding = model.stem()->token_embedding();
  if (embedding.defined() && embedding.dim() == 2) return embedding.size(0);
  return std::nullopt;
}
}  // namespace

// A rank that fails to set up (a bad NVMe directory, a budget too small) stops every rank here,
// each naming it, rather than leaving the others waiting at the first collective.
Engine::Engine(LayeredModel model, EngineConfig config) : vocab_size_(model_vocab_size(model)) {
  const std::shared_ptr<dist::Communicator> communicator = config.communicator;
  detail::on_every_rank(communicator.get(), "engine set-up",
                        [&] { trainer_ = make_trainer(std::move(model), std::move(config)); });
  detail::require_same_schedule(trainer_->config(), parameter_count());
}

Engine::~Engine() = default;

torch::Tensor Engine::forward(const data::Batch& batch) {
  data::check_batch(batch, vocab_size_);
  return trainer_->forward(batch);
}

void Engine::backward(const torch::Tensor& loss) { trainer_->backward(loss); }

StepResult Engine::step() { return trainer_->step(); }

std::optional<StepResult> Engine::train_step(const data::Batch& batch) {
  data::check_batch(batch, vocab_size_);
  return trainer_->train_step(batch);
}

void Engine::flush() { trainer_->flush(); }

double Engine::evaluate(const data::Batch& batch) {
  data::check_batch(batch, vocab_size_);
  torch::Tensor logits = trainer_->logits(batch.input_ids, batch.attention_mask, batch.position_ids);
  torch::NoGradGuard no_grad;
  return model().loss(logits, batch.labels.to(config().device, torch::kLong)).item<double>();
}

torch::Tensor Engine::logits(const torch::Tensor& tokens) {
  data::check_token_ids(tokens, "tokens", vocab_size_);
  return trainer_->logits(tokens, torch::Tensor());
}

std::vector<std::int64_t> Engine::generate(const std::vector<std::int64_t>& prompt, std::int64_t max_new_tokens,
                                           std::optional<std::int64_t> stop_token) {
  FERRY_CHECK(!prompt.empty(), "generate() needs a prompt of at least one token");
  std::vector<std::int64_t> sequence = prompt;
  std::vector<std::int64_t> generated;
  for (std::int64_t i = 0; i < max_new_tokens; ++i) {
    torch::Tensor tokens = torch::tensor(sequence, torch::kLong).unsqueeze(0);
    torch::Tensor next_logits = logits(tokens);
    std::int64_t next = next_logits.select(1, next_logits.size(1) - 1).argmax(-1).item<std::int64_t>();
    if (stop_token && next == *stop_token) break;
    generated.push_back(next);
    sequence.push_back(next);
  }
  return generated;
}

std::string Engine::write_trace(const std::string& path) const {
  const detail::Tracer& tracer = trainer_->tracer();
  FERRY_CHECK(tracer.enabled(), "write_trace() needs EngineConfig::trace = true");
  tracer.write(path);
  return tracer.overlap_summary();
}

const LayeredModel& Engine::model() const { return trainer_->model(); }
const EngineConfig& Engine::config() const { return trainer_->config(); }
std::int64_t Engine::steps_taken() const { return trainer_->steps(); }

double Engine::current_lr() const {
  return detail::scheduled_lr(config().schedule, config().optimizer.lr, steps_taken() + 1);
}

std::int64_t Engine::parameter_count() const {
  std::int64_t count = 0;
  for (const detail::Part& part : trainer_->parts()) count += part.numel + part.frozen_numel;
  return count;
}

std::optional<std::int64_t> Engine::vocab_size() const { return vocab_size_; }

std::int64_t Engine::trainable_parameter_count() const {
  std::int64_t count = 0;
  for (const detail::Part& part : trainer_->parts()) count += part.numel;
  return count;
}

EngineStats Engine::stats() const { return trainer_->stats(); }

}  // namespace ferry
