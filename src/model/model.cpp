#include "ferry/model.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/version.h>
#if FERRY_WITH_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>
#endif

#include "ferry/check.h"

namespace ferry {

torch::Tensor rope_inverse_frequencies(std::int64_t head_dim, double theta,
                                       const models::RopeScaling& scaling) {
  FERRY_CHECK(head_dim > 0 && head_dim % 2 == 0, "RoPE head_dim must be even and positive, got ",
              head_dim);
  auto exponents = torch::arange(0, head_dim, 2, torch::kInt64).to(torch::kFloat) /
                   static_cast<double>(head_dim);
  torch::Tensor inverse = 1.0 / torch::pow(theta, exponents);
  if (scaling.type == "default") {
    return inverse;
  }
  if (scaling.type == "linear") {
    return inverse / scaling.factor;
  }
  FERRY_CHECK(scaling.type == "llama3", "rope scaling type '", scaling.type,
              "' is not supported (valid: default, linear, llama3)");
  // transformers' _compute_llama3_parameters: long wavelengths are divided by the factor, short
  // ones kept, and the band between interpolates smoothly.
  const double old_context = static_cast<double>(scaling.original_max_position_embeddings);
  const double low_freq_wavelen = old_context / scaling.low_freq_factor;
  const double high_freq_wavelen = old_context / scaling.high_freq_factor;
  torch::Tensor wavelen = 2 * M_PI / inverse;
  torch::Tensor scaled =
      torch::where(wavelen > low_freq_wavelen, inverse / scaling.factor, inverse);
  torch::Tensor smooth = (old_context / wavelen - scaling.low_freq_factor) /
                         (scaling.high_freq_factor - scaling.low_freq_factor);
  torch::Tensor smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled;
  torch::Tensor is_medium = (wavelen >= high_freq_wavelen).logical_and(wavelen <= low_freq_wavelen);
  return torch::where(is_medium, smoothed, scaled);
}

RotaryEmbedding::RotaryEmbedding(std::int64_t head_dim, double theta,
                                 models::RopeScaling scaling)
    : head_dim_(head_dim),
      inverse_frequencies_(rope_inverse_frequencies(head_dim, theta, scaling)) {}

std::pair<torch::Tensor, torch::Tensor> RotaryEmbedding::cos_sin(std::int64_t seq_len,
                                                                 torch::Device device,
                                                                 torch::ScalarType dtype) const {
  std::lock_guard<std::mutex> lock(mutex_);
  Table& table = tables_[{device.str(), static_cast<int>(dtype)}];
  if (!table.cos.defined() || table.cos.size(0) < seq_len) {
    std::int64_t length = 64;
    while (length < seq_len) {
      length *= 2;
    }
    auto options = torch::TensorOptions().dtype(torch::kFloat).device(device);
    torch::Tensor positions = torch::arange(length, options);
    torch::Tensor frequencies = torch::outer(positions, inverse_frequencies_.to(device));
    torch::Tensor angles = torch::cat({frequencies, frequencies}, -1);
    table.cos = angles.cos().to(dtype);
    table.sin = angles.sin().to(dtype);
  }
  return {table.cos.narrow(0, 0, seq_len), table.sin.narrow(0, 0, seq_len)};
}

torch::Tensor apply_rotary(const torch::Tensor& x, const torch::Tensor& cos,
                           const torch::Tensor& sin) {
  const std::int64_t half = x.size(-1) / 2;
  torch::Tensor rotated = torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

namespace {

// transformers' repeat_kv: kv head h serves query heads h * n_rep ... h * n_rep + n_rep - 1.
torch::Tensor repeat_kv(const torch::Tensor& x, std::int64_t n_rep) {
  if (n_rep == 1) {
    return x;
  }
  const auto batch = x.size(0), heads = x.size(1), seq = x.size(2), dim = x.size(3);
  return x.unsqueeze(2).expand({batch, heads, n_rep, seq, dim}).reshape(
      {batch, heads * n_rep, seq, dim});
}

#if TORCH_VERSION_MAJOR < 2
torch::Tensor plain_attention(const torch::Tensor& q, const torch::Tensor& k,
                              const torch::Tensor& v, const torch::Tensor& mask) {
  const std::int64_t seq_q = q.size(2), seq_k = k.size(2);
  torch::Tensor scores = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(double(q.size(-1)));
  torch::Tensor allowed =
      mask.defined() ? mask
                     : torch::ones({seq_q, seq_k}, q.options().dtype(torch::kBool)).tril();
  scores = scores.masked_fill(allowed.logical_not(), -std::numeric_limits<float>::infinity());
  return torch::matmul(torch::softmax(scores, -1, torch::kFloat).to(q.scalar_type()), v);
}
#endif

}  // namespace

torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const StepContext& context) {
  FERRY_ASSERT(q.size(1) % k.size(1) == 0, "query heads must be a multiple of kv heads");
  const std::int64_t n_rep = q.size(1) / k.size(1);
  torch::Tensor keys = repeat_kv(k, n_rep);
  torch::Tensor values = repeat_kv(v, n_rep);
  const torch::Tensor& mask = context.attention_mask;
#if TORCH_VERSION_MAJOR >= 2
  if (mask.defined()) {
    return at::scaled_dot_product_attention(q, keys, values, mask, 0.0, /*is_causal=*/false);
  }
  return at::scaled_dot_product_attention(q, keys, values, {}, 0.0, /*is_causal=*/true);
#else
  return plain_attention(q, keys, values, mask);
#endif
}

namespace {

std::uint64_t mix_seed(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// One generator per mask, seeded from everything that tells the mask apart from the others.
at::Generator dropout_generator(const StepContext& context, std::int64_t part, int site, torch::Device device) {
  std::uint64_t seed = mix_seed(context.dropout.seed);
  for (std::uint64_t value : {static_cast<std::uint64_t>(context.dropout.step),
                              static_cast<std::uint64_t>(context.dropout.micro_batch), static_cast<std::uint64_t>(part),
                              static_cast<std::uint64_t>(site)}) {
    seed = mix_seed(seed ^ value);
  }
  if (device.is_cuda()) {
#if FERRY_WITH_CUDA
    at::Generator generator = at::cuda::detail::createCUDAGenerator(device.index());
    generator.set_current_seed(seed);
    return generator;
#else
    FERRY_CHECK(false, "dropout on ", device, " needs ferry built with CUDA");
#endif
  }
  return at::detail::createCPUGenerator(seed);
}

torch::Tensor attention_probabilities_dropped(const torch::Tensor& q, const torch::Tensor& keys,
                                              const torch::Tensor& values, const StepContext& context,
                                              std::int64_t part, int site) {
  const std::int64_t seq_q = q.size(2), seq_k = keys.size(2);
  torch::Tensor scores = torch::matmul(q, keys.transpose(-2, -1)) / std::sqrt(static_cast<double>(q.size(-1)));
  torch::Tensor allowed = context.attention_mask.defined()
                              ? context.attention_mask
                              : torch::ones({seq_q, seq_k}, q.options().dtype(torch::kBool)).tril();
  scores = scores.masked_fill(allowed.logical_not(), -std::numeric_limits<float>::infinity());
  torch::Tensor probabilities = torch::softmax(scores, -1, torch::kFloat).to(q.scalar_type());
  return torch::matmul(dropout(probabilities, context.dropout.rates.attention, context, part, site), values);
}

}  // namespace

torch::Tensor dropout(const torch::Tensor& x, double p, const StepContext& context, std::int64_t part, int site) {
  if (!context.dropout.training || p <= 0) return x;
  FERRY_CHECK(p < 1, "dropout probability ", p, " is invalid: valid are 0 <= p < 1");
  at::Generator generator = dropout_generator(context, part, site, x.device());
  torch::Tensor keep = at::empty(x.sizes(), x.options()).bernoulli_(1 - p, generator);
  return x * keep * (1.0 / (1 - p));
}

torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const StepContext& context, std::int64_t part, int site) {
  if (!context.dropout.training || context.dropout.rates.attention <= 0) return attention(q, k, v, context);
  FERRY_ASSERT(q.size(1) % k.size(1) == 0, "query heads must be a multiple of kv heads");
  const std::int64_t n_rep = q.size(1) / k.size(1);
  return attention_probabilities_dropped(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), context, part, site);
}

torch::Tensor causal_lm_loss(const torch::Tensor& logits, const torch::Tensor& labels) {
  FERRY_CHECK(logits.dim() == 3 && labels.dim() == 2 && logits.size(0) == labels.size(0) &&
                  logits.size(1) == labels.size(1),
              "causal_lm_loss needs logits [batch, seq, vocab] and labels [batch, seq], got ",
              logits.sizes(), " and ", labels.sizes());
  const std::int64_t seq = logits.size(1);
  if (seq < 2) {
    return torch::zeros({}, logits.options().dtype(torch::kFloat));
  }
  const std::int64_t batch = logits.size(0), vocab = logits.size(2);
  torch::Tensor targets = labels.narrow(1, 1, seq - 1).to(torch::kLong);
  // Note: the fp32 copy of the logits and its log-softmax are each twice the bf16 logits (1.5 GiB
  // for OPT's vocabulary at batch 8 x 512): where no gradient flows back (evaluation, zo2) the
  // sequences go through in groups of at most kLossGroupLogits logits. With a gradient the batch
  // goes through at once: each group's backward would build a zero-filled gradient of all the
  // logits. One group, as in every test model, sums in the same order either way.
  const std::int64_t group = logits.requires_grad() && torch::GradMode::is_enabled()
                                 ? batch
                                 : std::max<std::int64_t>(1, models::kLossGroupLogits / ((seq - 1) * vocab));
  torch::Tensor summed;
  for (std::int64_t start = 0; start < batch; start += group) {
    const std::int64_t rows = std::min(group, batch - start);
    torch::Tensor predicted = logits.narrow(0, start, rows).narrow(1, 0, seq - 1).to(torch::kFloat);
    torch::Tensor part = at::cross_entropy_loss(predicted.reshape({-1, vocab}),
                                                targets.narrow(0, start, rows).reshape({-1}), {},
                                                at::Reduction::Sum, kIgnoreIndex);
    summed = summed.defined() ? summed + part : part;
  }
  torch::Tensor counted = targets.ne(kIgnoreIndex).sum().clamp_min(1).to(torch::kFloat);
  return summed / counted;
}

torch::Tensor answer_only_labels(const torch::Tensor& tokens, const torch::Tensor& prompt_mask,
                                 const torch::Tensor& padding_mask) {
  FERRY_CHECK(tokens.sizes() == prompt_mask.sizes(), "prompt_mask has shape ",
              prompt_mask.sizes(), " but tokens have shape ", tokens.sizes());
  torch::Tensor labels = tokens.to(torch::kLong).masked_fill(prompt_mask.to(torch::kBool),
                                                             kIgnoreIndex);
  if (padding_mask.defined()) {
    FERRY_CHECK(tokens.sizes() == padding_mask.sizes(), "padding_mask has shape ",
                padding_mask.sizes(), " but tokens have shape ", tokens.sizes());
    labels.masked_fill_(padding_mask.to(torch::kBool).logical_not(), kIgnoreIndex);
  }
  return labels;
}

bool is_no_decay(const std::string& name, const torch::Tensor& parameter) {
  const std::string suffix = ".bias";
  const bool is_bias = name == "bias" || (name.size() > suffix.size() &&
                                          name.compare(name.size() - suffix.size(),
                                                       suffix.size(), suffix) == 0);
  return is_bias || parameter.dim() < 2;
}

torch::ScalarType to_scalar_type(DType dtype) {
  switch (dtype) {
    case DType::kBool: return torch::kBool;
    case DType::kU8: return torch::kUInt8;
    case DType::kI8: return torch::kInt8;
    case DType::kI16: return torch::kInt16;
    case DType::kI32: return torch::kInt32;
    case DType::kI64: return torch::kInt64;
    case DType::kF16: return torch::kHalf;
    case DType::kBF16: return torch::kBFloat16;
    case DType::kF32: return torch::kFloat;
    case DType::kF64: return torch::kDouble;
    default: break;
  }
  FERRY_CHECK(false, "dtype ", dtype_name(dtype), " has no LibTorch equivalent here (valid: ",
              "BOOL, U8, I8, I16, I32, I64, F16, BF16, F32, F64)");
  return torch::kFloat;
}

DType to_dtype(torch::ScalarType scalar_type) {
  switch (scalar_type) {
    case torch::kBool: return DType::kBool;
    case torch::kUInt8: return DType::kU8;
    case torch::kInt8: return DType::kI8;
    case torch::kInt16: return DType::kI16;
    case torch::kInt32: return DType::kI32;
    case torch::kInt64: return DType::kI64;
    case torch::kHalf: return DType::kF16;
    case torch::kBFloat16: return DType::kBF16;
    case torch::kFloat: return DType::kF32;
    case torch::kDouble: return DType::kF64;
    default: break;
  }
  FERRY_CHECK(false, "torch dtype ", scalar_type, " has no safetensors equivalent");
  return DType::kF32;
}

LayeredModel::LayeredModel(std::shared_ptr<Stem> stem, std::vector<std::shared_ptr<Block>> blocks,
                           std::shared_ptr<Head> head, ContextOptions context_options,
                           LossFunction loss, std::optional<models::ModelConfig> config)
    : stem_(std::move(stem)),
      blocks_(std::move(blocks)),
      head_(std::move(head)),
      context_options_(std::move(context_options)),
      loss_(std::move(loss)),
      config_(std::move(config)) {
  FERRY_CHECK(stem_ != nullptr && head_ != nullptr, "a LayeredModel needs a stem and a head");
  for (std::size_t i = 0; i < blocks_.size(); ++i) {
    FERRY_CHECK(blocks_[i] != nullptr, "block ", i, " of the LayeredModel is null");
  }
  FERRY_CHECK(loss_ != nullptr, "a LayeredModel needs a loss function");
  FERRY_CHECK(context_options_.sliding_window >= 0, "sliding_window must be >= 0, got ",
              context_options_.sliding_window);
}

StepContext LayeredModel::make_context(const torch::Tensor& tokens, const torch::Tensor& padding_mask,
                                       const torch::Tensor& position_ids) const {
  FERRY_CHECK(tokens.dim() == 2, "tokens must be [batch, seq], got shape ", tokens.sizes());
  const std::int64_t batch = tokens.size(0), seq = tokens.size(1);
  const auto index_options = torch::TensorOptions().dtype(torch::kLong).device(tokens.device());
  const auto bool_options = index_options.dtype(torch::kBool);
  torch::Tensor real;
  if (padding_mask.defined()) {
    FERRY_CHECK(padding_mask.sizes() == tokens.sizes(), "padding_mask has shape ",
                padding_mask.sizes(), " but tokens have shape ", tokens.sizes());
    real = padding_mask.to(bool_options);
  }
  const torch::Tensor counting = torch::arange(seq, index_options).unsqueeze(0).expand({batch, seq});
  // Positions that restart within a row: packed documents. Rows of plain 0, 1, 2, ... take the
  // ordinary causal path.
  torch::Tensor restarted;
  if (position_ids.defined()) {
    FERRY_CHECK(position_ids.sizes() == tokens.sizes(), "position_ids has shape ", position_ids.sizes(),
                " but tokens have shape ", tokens.sizes());
    torch::Tensor given = position_ids.to(index_options);
    if (!given.equal(counting)) restarted = given;
  }

  StepContext context;
  context.dropout.rates = context_options_.dropout;
  if (restarted.defined()) {
    context.positions = real.defined() && context_options_.positions_from_padding_mask
                            ? restarted.masked_fill(real.logical_not(), -1)
                            : restarted;
  } else if (context_options_.positions_from_padding_mask && real.defined()) {
    torch::Tensor counted = real.to(torch::kLong);
    context.positions = counted.cumsum(1) * counted - 1;
  } else {
    context.positions = counting;
  }

  // Note: a query at a padding position would see no key at all under a pure key-padding
  // mask and produce NaN. Every query is allowed to see itself, so padding rows stay finite;
  // their outputs are never used because their labels are ignored.
  if (real.defined() || context_options_.sliding_window > 0 || restarted.defined()) {
    torch::Tensor query = torch::arange(seq, index_options).unsqueeze(1);
    torch::Tensor key = torch::arange(seq, index_options).unsqueeze(0);
    torch::Tensor allowed = key.le(query);
    if (context_options_.sliding_window > 0) {
      allowed = allowed.logical_and((query - key).lt(context_options_.sliding_window));
    }
    allowed = allowed.view({1, 1, seq, seq});
    if (restarted.defined()) {
      // A document starts wherever the position is 0; a query sees keys of its own document only.
      torch::Tensor document = restarted.eq(0).to(torch::kLong).cumsum(1);
      allowed = allowed.logical_and(document.unsqueeze(2).eq(document.unsqueeze(1)).unsqueeze(1));
    }
    if (real.defined()) {
      allowed = allowed.logical_and(real.view({batch, 1, 1, seq}));
    }
    context.attention_mask = allowed.logical_or(key.eq(query).view({1, 1, seq, seq}));
  }

  if (context_options_.rope != nullptr) {
    std::tie(context.rope_cos, context.rope_sin) =
        context_options_.rope->cos_sin(seq, tokens.device(), dtype());
    if (restarted.defined()) {
      const torch::Tensor flat = restarted.clamp_min(0).reshape({-1});
      context.rope_cos = context.rope_cos.index_select(0, flat).view({batch, seq, -1});
      context.rope_sin = context.rope_sin.index_select(0, flat).view({batch, seq, -1});
    }
  }
  return context;
}

void LayeredModel::set_dropout(double rate) {
  FERRY_CHECK(rate >= 0 && rate < 1, "dropout rate ", rate, " is invalid: valid are 0 <= rate < 1");
  context_options_.dropout = {rate, rate, rate};
}

torch::Tensor LayeredModel::forward(const torch::Tensor& tokens, const torch::Tensor& padding_mask,
                                    const torch::Tensor& position_ids) const {
  StepContext context = make_context(tokens, padding_mask, position_ids);
  torch::Tensor hidden = stem_->forward(tokens, context);
  for (const auto& block : blocks_) {
    hidden = block->forward(hidden, context);
  }
  return head_->forward(hidden, context);
}

torch::Tensor LayeredModel::loss(const torch::Tensor& logits, const torch::Tensor& labels) const {
  return loss_(logits, labels);
}

std::vector<torch::Tensor> LayeredModel::parameters() const {
  std::vector<torch::Tensor> result = stem_->parameters();
  for (const auto& block : blocks_) {
    for (const torch::Tensor& parameter : block->parameters()) {
      result.push_back(parameter);
    }
  }
  for (const torch::Tensor& parameter : head_->parameters()) {
    result.push_back(parameter);
  }
  return result;
}

std::int64_t LayeredModel::parameter_count() const {
  std::int64_t count = 0;
  for (const torch::Tensor& parameter : parameters()) {
    count += parameter.numel();
  }
  return count;
}

torch::ScalarType LayeredModel::dtype() const {
  std::vector<torch::Tensor> stem_parameters = stem_->parameters();
  return stem_parameters.empty() ? torch::kFloat : stem_parameters.front().scalar_type();
}

torch::Device LayeredModel::device() const {
  std::vector<torch::Tensor> stem_parameters = stem_->parameters();
  return stem_parameters.empty() ? torch::Device(torch::kCPU) : stem_parameters.front().device();
}

void LayeredModel::to(torch::Device device) {
  stem_->to(device);
  for (const auto& block : blocks_) {
    block->to(device);
  }
  head_->to(device);
}

void LayeredModel::to(torch::Device device, torch::ScalarType dtype) {
  stem_->to(device, dtype);
  for (const auto& block : blocks_) {
    block->to(device, dtype);
  }
  head_->to(device, dtype);
  if (config_.has_value()) {
    config_->dtype = to_dtype(dtype);
  }
}

void LayeredModel::train(bool on) {
  stem_->train(on);
  for (const auto& block : blocks_) {
    block->train(on);
  }
  head_->train(on);
}

}  // namespace ferry
