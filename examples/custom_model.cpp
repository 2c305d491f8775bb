// Assembling a LayeredModel from your own torch::nn modules: a stem, blocks and a tied head.
// The engine drives any such model block by block, exactly like the built-in families.
//
//   ./build/examples/example_custom_model

#include <cstdio>
#include <memory>

#include <torch/torch.h>

#include "ferry/model.h"

namespace {

constexpr int64_t kVocab = 32;
constexpr int64_t kDim = 16;

class EmbeddingStem : public ferry::Stem {
 public:
  EmbeddingStem() {
    weight_ = register_parameter("embedding", torch::randn({kVocab, kDim}) * 0.1);
  }
  torch::Tensor forward(const torch::Tensor& tokens, const ferry::StepContext&) override {
    return weight_.index({tokens});
  }
  torch::Tensor token_embedding() const override { return weight_; }

 private:
  torch::Tensor weight_;
};

// A pre-norm residual block: causal self-attention through ferry::attention, then an MLP.
class AttentionMlpBlock : public ferry::Block {
 public:
  AttentionMlpBlock()
      : norm_(register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kDim})))),
        qkv_(register_module("qkv", torch::nn::Linear(kDim, 3 * kDim))),
        mlp_(register_module("mlp", torch::nn::Linear(kDim, kDim))) {}

  torch::Tensor forward(const torch::Tensor& hidden, const ferry::StepContext& context) override {
    auto parts = qkv_->forward(norm_->forward(hidden)).view({hidden.size(0), hidden.size(1), 3, 2, -1});
    auto heads = [&](int64_t i) { return parts.select(2, i).transpose(1, 2); };  // [b, 2, t, d]
    auto attended = ferry::attention(heads(0), heads(1), heads(2), context);
    auto x = hidden + attended.transpose(1, 2).reshape(hidden.sizes());
    return x + torch::gelu(mlp_->forward(x));
  }

 private:
  torch::nn::LayerNorm norm_;
  torch::nn::Linear qkv_;
  torch::nn::Linear mlp_;
};

class TiedHead : public ferry::Head {
 public:
  explicit TiedHead(torch::Tensor embedding) : embedding_(std::move(embedding)) {}
  torch::Tensor forward(const torch::Tensor& hidden, const ferry::StepContext&) override {
    return torch::matmul(hidden, embedding_.t());
  }

 private:
  torch::Tensor embedding_;  // the stem's parameter, not registered again here
};

}  // namespace

int main() {
  torch::manual_seed(0);
  auto stem = std::make_shared<EmbeddingStem>();
  std::vector<std::shared_ptr<ferry::Block>> blocks = {std::make_shared<AttentionMlpBlock>(),
                                                       std::make_shared<AttentionMlpBlock>()};
  ferry::LayeredModel model(stem, blocks, std::make_shared<TiedHead>(stem->token_embedding()));

  // Learn to continue a repeating sequence 0 1 2 ... 7 0 1 2 ...
  auto tokens = (torch::arange(24) % 8).view({1, 24});
  torch::optim::Adam optimizer(model.parameters(), torch::optim::AdamOptions(1e-2));
  for (int step = 0; step <= 100; ++step) {
    auto loss = model.loss(model.forward(tokens), tokens);
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
    if (step % 25 == 0) {
      std::printf("step %3d  loss %.4f\n", step, loss.item<double>());
    }
  }
  std::printf("%lld parameters in %zu blocks\n", static_cast<long long>(model.parameter_count()),
              model.num_blocks());
  return 0;
}
