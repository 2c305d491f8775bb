// The plain LibTorch loop `ferry bench finetune` measures ferry against, checked as a loop: on a
// tiny model in fp32 on the CPU it trains what ferry's gpu mode trains (the same losses step by
// step), with LoRA over the adapters alone and without it over every parameter. The bench's ratio
// is then one of two runs of the same training.

#include <cmath>

#include <torch/torch.h>

#include "cli/plain_loop.h"
#include "ferry/engine.h"
#include "ferry/model.h"
#include "support/catch.h"

namespace ferry::cli {
namespace {

TEST_CASE("the plain loop trains what ferry's gpu mode trains: LoRA's adapters alone, or every parameter") {
  const std::int64_t rank = GENERATE(4, 0);
  INFO("LoRA rank " << rank);
  models::ModelConfig model = models::preset("tiny-llama");
  model.lora.rank = rank;
  model.lora.alpha = 8;
  OptimizerConfig adamw;
  adamw.lr = 3e-3;
  // torch's AdamW decays every parameter and ferry's not the norms; with LoRA every trained one
  // is a matrix, which both decay.
  adamw.weight_decay = rank > 0 ? 0.01 : 0.0;

  PlainLoop loop(model, 7, torch::kCPU, torch::kFloat, adamw);
  std::int64_t trained = 0;
  for (const torch::Tensor& p : loop.trained()) trained += p.numel();
  CHECK(trained == (rank > 0 ? model.num_layers * model.lora_parameter_count() : model.parameter_count()));
  CHECK(loop.optimizer_name() == std::string("torch::optim::AdamW"));

  EngineConfig config;
  config.mode = Mode::kGpu;
  config.optimizer = adamw;
  Engine engine(models::build(model, 7), config);
  std::vector<double> losses;
  for (int step = 0; step < 6; ++step) {
    INFO("step " << step + 1);
    const data::Batch batch = data::random_batch(4, 16, model.vocab_size, step % 2);
    const double expected = engine.train_step(batch)->loss;
    losses.push_back(loop.step(batch).item<double>());
    CHECK(std::abs(losses.back() - expected) <= 1e-5 * expected);
  }
  CHECK(losses.back() < losses.front());
}

TEST_CASE("the plain loop refuses an optimizer other than AdamW") {
  OptimizerConfig sgd;
  sgd.kind = OptimizerKind::kSgd;
  CHECK_THROWS_WITH(PlainLoop(models::preset("tiny-llama"), 7, torch::kCPU, torch::kFloat, sgd),
                    Catch::Contains("AdamW") && Catch::Contains("sgd"));
}

}  // namespace
}  // namespace ferry::cli
