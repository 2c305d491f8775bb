#include "plan/costs.h"

#include <algorithm>
#include <cmath>

namespace ferry::detail {
namespace {

// Note: bytes per token. The terms follow what each op of the family's forward saves for its
// backward (autograd saves an input only when the other input needs a gradient), with `e` the
// compute element size. Attention saves q, k and v (k and v after repeat_kv, so at full head
// count) and, fused, its output and a logsumexp per head; materialized, the fp32 softmax and its
// cast. Norms on bf16/fp16 inputs keep an fp32 copy (LLaMA's RMSNorm upcasts; layer_norm keeps
// fp32 mean and rstd only).
struct PerToken {
  double graph = 0;
  double forward_working = 0;
  double backward_working = 0;
};

PerToken per_token(const models::ModelConfig& config, const ActivationShape& shape) {
  const double e = static_cast<double>(shape.element_size);
  const double h = static_cast<double>(config.hidden_size);
  const double i = static_cast<double>(config.intermediate_size);
  const double q = static_cast<double>(config.num_heads * config.head_dim);
  const double a = static_cast<double>(config.num_heads);
  const double s = static_cast<double>(shape.seq);
  // Materialized, torch::matmul folds its transposed operands (k^T, then v) into contiguous
  // copies and saves those.
  const double attention_saved =
      shape.fused_attention ? e * q + 4 * a : 4 * a * s + (e < 4 ? e * a * s : 0) + 2 * e * q;
  const double attention_working =
      shape.fused_attention ? 5 * e * q : (4 + 2 * e) * a * s + 4 * e * q;
  PerToken out;
  switch (config.family) {
    case models::Family::kLlama: {
      const double norm = (e < 4 ? 4 * h : 0) + e * h;  // fp32 copy (unless fp32) + normed output
      const double second_norm = 4 * h + e * h;          // the residual sum in fp32 + normed output
      out.graph = e * h + norm + 3 * e * q + attention_saved + e * q + second_norm + 4 * e * i;
      out.forward_working = std::max(attention_working, 3 * e * i) + e * h;
      break;
    }
    case models::Family::kOpt: {
      const double layer_norm = 8 + e * h;  // mean, rstd + normed output
      out.graph = e * h + layer_norm + 3 * e * h + attention_saved + e * h + (e * h + layer_norm) + e * i;
      out.forward_working = std::max(attention_working, 2 * e * i) + e * h;
      break;
    }
    case models::Family::kGpt2: {
      const double layer_norm = 8 + e * h;
      // The tanh GELU as written saves x, tanh, 0.5x, 1 + tanh and its output.
      out.graph = e * h + layer_norm + 3 * e * h + attention_saved + e * h + (e * h + layer_norm) + 5 * e * i;
      out.forward_working = std::max(attention_working, 4 * e * i) + e * h;
      break;
    }
  }
  out.backward_working = 2 * e * i + 2 * e * h + (shape.fused_attention ? 0 : (4 + e) * a * s);
  return out;
}

std::uint64_t times_tokens(double per_token_bytes, const ActivationShape& shape) {
  return static_cast<std::uint64_t>(per_token_bytes * static_cast<double>(shape.batch * shape.seq));
}

}  // namespace

BlockCosts block_costs(const models::ModelConfig& config, const ActivationShape& shape) {
  const PerToken bytes = per_token(config, shape);
  const double tokens = static_cast<double>(shape.batch * shape.seq);
  const double s = static_cast<double>(shape.seq);
  const double q = static_cast<double>(config.num_heads * config.head_dim);
  BlockCosts costs;
  costs.checkpoint_bytes = times_tokens(static_cast<double>(shape.element_size * config.hidden_size), shape);
  costs.graph_bytes = times_tokens(bytes.graph, shape);
  costs.forward_working_bytes = times_tokens(bytes.forward_working, shape);
  costs.backward_working_bytes = times_tokens(bytes.backward_working, shape);
  // Scores and weighted values: 2 x 2 s q FLOPs per token; the fused kernels skip the masked half.
  const double attention = (shape.fused_attention ? 2.0 : 4.0) * s * q * tokens;
  costs.forward_flops = 2.0 * static_cast<double>(config.block_parameter_count()) * tokens + attention;
  return costs;
}

HeadCosts head_costs(const models::ModelConfig& config, const ActivationShape& shape) {
  const double e = static_cast<double>(shape.element_size);
  const double v = static_cast<double>(config.vocab_size);
  const double tokens = static_cast<double>(shape.batch * shape.seq);
  HeadCosts costs;
  // causal_lm_loss: logits, their shifted copy, the fp32 copy (the logits themselves in fp32) and
  // the log-softmax that cross entropy saves; in backward the saved log-softmax, its gradient and
  // the gradient of its input.
  // The final norm's saved tensors (as a block's first norm) and the log-softmax.
  const double h = static_cast<double>(config.hidden_size);
  costs.saved_bytes = times_tokens(4 * v + (e < 4 ? 4 * h : 0) + e * h + (e < 4 ? 0 : 4 * h), shape);
  // Without a graph the loss takes a group of sequences at a time (models::kLossGroupLogits): the
  // logits, and the group's fp32 copy and log-softmax.
  const double sequence_logits = static_cast<double>(shape.seq - 1) * v;
  const double group_sequences = std::min(
      static_cast<double>(shape.batch),
      std::max(1.0, std::floor(static_cast<double>(models::kLossGroupLogits) / std::max(1.0, sequence_logits))));
  costs.forward_logits_bytes = times_tokens(e * v, shape) +
                               static_cast<std::uint64_t>(8 * group_sequences * sequence_logits);
  costs.peak_bytes = std::max(costs.forward_logits_bytes, times_tokens(12 * v, shape));
  const double embed = static_cast<double>(config.embed_dim());
  const double projection =
      config.embed_dim() != config.hidden_size ? static_cast<double>(config.hidden_size) * embed : 0;
  costs.forward_flops = 2.0 * (v * embed + projection) * tokens;
  return costs;
}

}  // namespace ferry::detail
