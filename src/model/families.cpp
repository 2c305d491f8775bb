// The built-in families, computed as transformers computes them: GPT-2 (GPT2LMHeadModel), OPT
// (OPTForCausalLM) and LLaMA, which also serves Mistral and Qwen2. Each part registers exactly
// the parameters its ModelConfig declares, so the planner's sizes and the modules agree.

#include <cmath>
#include <map>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include "ferry/check.h"
#include "ferry/model.h"

namespace ferry::models {
namespace {

using Parameters = std::map<std::string, torch::Tensor>;

std::shared_ptr<torch::nn::Module> child(torch::nn::Module& parent, const std::string& name) {
  auto children = parent.named_children();
  if (const auto* found = children.find(name)) {
    return *found;
  }
  return parent.register_module(name, std::make_shared<torch::nn::Module>(name));
}

// Registers each spec under its dotted name ("self_attn.q_proj.weight" becomes parameter
// "weight" of child "q_proj" of child "self_attn"), so that named_parameters() yields the
// Hugging Face names in spec order.
//
// Note: the returned handles share their TensorImpl with the registered parameters. The engine
// rebinds parameters with set_data(), which swaps the data inside that TensorImpl, so these
// handles (and a tied head's handle on the embedding) follow without being re-fetched.
Parameters register_parameters(torch::nn::Module& module, const std::vector<ParameterSpec>& specs,
                               torch::ScalarType dtype, bool trainable = true) {
  Parameters parameters;
  for (const ParameterSpec& spec : specs) {
    torch::nn::Module* owner = &module;
    std::size_t start = 0;
    for (std::size_t dot = spec.name.find('.'); dot != std::string::npos;
         dot = spec.name.find('.', start)) {
      owner = child(*owner, spec.name.substr(start, dot - start)).get();
      start = dot + 1;
    }
    parameters[spec.name] =
        owner->register_parameter(spec.name.substr(start), torch::empty(spec.shape, dtype), trainable);
  }
  return parameters;
}

// A part's own parameters: frozen when the config trains LoRA adapters instead.
Parameters register_base(torch::nn::Module& module, const ModelConfig& config,
                         const std::vector<ParameterSpec>& specs) {
  return register_parameters(module, specs, to_scalar_type(config.dtype), !config.lora.enabled());
}

// A block's parameters: its base ones, then its LoRA adapters.
Parameters register_block(torch::nn::Module& module, const ModelConfig& config) {
  Parameters parameters = register_base(module, config, config.block_parameters());
  Parameters adapters = register_parameters(module, config.lora_parameters(), to_scalar_type(config.dtype));
  parameters.insert(adapters.begin(), adapters.end());
  return parameters;
}

const torch::Tensor& get(const Parameters& parameters, const std::string& name) {
  auto found = parameters.find(name);
  FERRY_ASSERT(found != parameters.end(), "no parameter ", name);
  return found->second;
}

// The parameter when the config declares it, else undefined (an absent bias).
torch::Tensor optional(const Parameters& parameters, const std::string& name) {
  auto found = parameters.find(name);
  return found == parameters.end() ? torch::Tensor() : found->second;
}

torch::Tensor layer_norm(const torch::Tensor& x, const Parameters& parameters,
                         const std::string& name, double eps) {
  return at::layer_norm(x, {x.size(-1)}, get(parameters, name + ".weight"),
                        get(parameters, name + ".bias"), eps);
}

// transformers' LlamaRMSNorm: normalised in fp32, cast back, then scaled in the input dtype.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  torch::Tensor h = x.to(torch::kFloat);
  h = h * torch::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * h.to(x.scalar_type());
}

torch::Tensor linear(const torch::Tensor& x, const Parameters& parameters,
                     const std::string& name) {
  return at::linear(x, get(parameters, name + ".weight"), optional(parameters, name + ".bias"));
}

// GPT-2's Conv1D: x @ weight + bias with weight [in, out].
torch::Tensor conv1d(const torch::Tensor& x, const Parameters& parameters,
                     const std::string& name) {
  const torch::Tensor& weight = get(parameters, name + ".weight");
  torch::Tensor flat = torch::addmm(get(parameters, name + ".bias"),
                                    x.reshape({-1, x.size(-1)}), weight);
  std::vector<std::int64_t> sizes = x.sizes().vec();
  sizes.back() = weight.size(1);
  return flat.view(sizes);
}

// A block's LoRA adapters (ModelConfig::lora): the linears they adapt, each with its dropout site.
struct Adapters {
  double scale = 0;
  double dropout = 0;
  std::int64_t part = 0;
  std::map<std::string, int> sites;  // module -> dropout site
};

constexpr int kFirstLoraSite = 3;  // after the block's own dropout sites

Adapters make_adapters(const ModelConfig& config, std::int64_t part) {
  Adapters adapters;
  if (!config.lora.enabled()) return adapters;
  adapters.scale = config.lora.scale();
  adapters.dropout = config.lora.dropout;
  adapters.part = part;
  int site = kFirstLoraSite;
  for (const LoraTarget& target : config.lora_targets()) adapters.sites[target.module] = site++;
  return adapters;
}

// y, the output of linear `name` for input x, plus its adapter's scale * B A dropout(x), summed
// in PEFT's order.
torch::Tensor adapted(torch::Tensor y, const torch::Tensor& x, const Parameters& parameters,
                      const std::string& name, const Adapters& adapters, const StepContext& context) {
  auto site = adapters.sites.find(name);
  if (site == adapters.sites.end()) return y;
  const torch::Tensor input = dropout(x, adapters.dropout, context, adapters.part, site->second);
  const torch::Tensor update = at::linear(at::linear(input, get(parameters, name + ".lora_A.weight")),
                                          get(parameters, name + ".lora_B.weight"));
  return y + update * adapters.scale;
}

torch::Tensor linear(const torch::Tensor& x, const Parameters& parameters, const std::string& name,
                     const Adapters& adapters, const StepContext& context) {
  return adapted(linear(x, parameters, name), x, parameters, name, adapters, context);
}

torch::Tensor conv1d(const torch::Tensor& x, const Parameters& parameters, const std::string& name,
                     const Adapters& adapters, const StepContext& context) {
  return adapted(conv1d(x, parameters, name), x, parameters, name, adapters, context);
}

torch::Tensor activate(const torch::Tensor& x, Activation activation) {
  switch (activation) {
    case Activation::kGeluTanh:
      return 0.5 * x * (1.0 + torch::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x.pow(3.0))));
    case Activation::kRelu:
      return torch::relu(x);
    case Activation::kSilu:
      return torch::silu(x);
  }
  FERRY_ASSERT(false, "unknown activation");
  return x;
}

// [batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim]
torch::Tensor split_heads(const torch::Tensor& x, std::int64_t head_dim) {
  return x.view({x.size(0), x.size(1), -1, head_dim}).transpose(1, 2);
}

// [batch, heads, seq, head_dim] -> [batch, seq, heads * head_dim]
torch::Tensor merge_heads(const torch::Tensor& x) {
  return x.transpose(1, 2).reshape({x.size(0), x.size(2), -1});
}

// The parts' numbers in dropout seeds (ferry::dropout): the stem 0, block i i + 1.
constexpr std::int64_t kStemPart = 0;
std::int64_t block_part(std::int64_t index) { return index + 1; }
// The dropouts of one block.
constexpr int kAttentionSite = 0;        // the attention probabilities
constexpr int kAttentionOutputSite = 1;  // the attention's output projection
constexpr int kMlpOutputSite = 2;        // the MLP's output projection

class Gpt2Stem final : public Stem {
 public:
  explicit Gpt2Stem(const ModelConfig& config)
      : parameters_(register_base(*this, config, config.stem_parameters())) {}

  torch::Tensor forward(const torch::Tensor& tokens, const StepContext& context) override {
    torch::Tensor embedded = at::embedding(get(parameters_, "wte.weight"), tokens) +
                             at::embedding(get(parameters_, "wpe.weight"), context.positions);
    return dropout(embedded, context.dropout.rates.embedding, context, kStemPart, 0);
  }

  torch::Tensor token_embedding() const override { return get(parameters_, "wte.weight"); }

 private:
  Parameters parameters_;
};

class Gpt2Block final : public Block {
 public:
  Gpt2Block(const ModelConfig& config, std::int64_t index)
      : config_(config),
        parameters_(register_block(*this, config)),
        part_(block_part(index)),
        adapters_(make_adapters(config, part_)) {}

  torch::Tensor forward(const torch::Tensor& hidden, const StepContext& context) override {
    const double residual_rate = context.dropout.rates.residual;
    torch::Tensor h = layer_norm(hidden, parameters_, "ln_1", config_.norm_eps);
    std::vector<torch::Tensor> qkv =
        conv1d(h, parameters_, "attn.c_attn", adapters_, context).split(config_.hidden_size, -1);
    torch::Tensor attended =
        attention(split_heads(qkv[0], config_.head_dim), split_heads(qkv[1], config_.head_dim),
                  split_heads(qkv[2], config_.head_dim), context, part_, kAttentionSite);
    torch::Tensor x = hidden + dropout(conv1d(merge_heads(attended), parameters_, "attn.c_proj", adapters_, context), residual_rate,
                                       context, part_, kAttentionOutputSite);
    h = layer_norm(x, parameters_, "ln_2", config_.norm_eps);
    h = activate(conv1d(h, parameters_, "mlp.c_fc", adapters_, context), config_.activation);
    return x + dropout(conv1d(h, parameters_, "mlp.c_proj", adapters_, context), residual_rate, context, part_, kMlpOutputSite);
  }

 private:
  ModelConfig config_;
  Parameters parameters_;
  std::int64_t part_;
  Adapters adapters_;
};

class Gpt2Head final : public Head {
 public:
  Gpt2Head(const ModelConfig& config, const Stem& stem)
      : config_(config),
        parameters_(register_base(*this, config, config.head_parameters())),
        lm_head_(config.tie_word_embeddings ? stem.token_embedding()
                                            : get(parameters_, "lm_head.weight")) {}

  torch::Tensor forward(const torch::Tensor& hidden, const StepContext& context) override {
    return at::linear(layer_norm(hidden, parameters_, "ln_f", config_.norm_eps), lm_head_);
  }

 private:
  ModelConfig config_;
  Parameters parameters_;
  torch::Tensor lm_head_;
};

class OptStem final : public Stem {
 public:
  explicit OptStem(const ModelConfig& config)
      : parameters_(register_base(*this, config, config.stem_parameters())) {}

  torch::Tensor forward(const torch::Tensor& tokens, const StepContext& context) override {
    torch::Tensor embedded = at::embedding(get(parameters_, "embed_tokens.weight"), tokens);
    if (parameters_.count("project_in.weight") != 0) {
      embedded = linear(embedded, parameters_, "project_in");
    }
    // OPTLearnedPositionalEmbedding: position p (-1 at padding) reads row p + 2.
    return embedded +
           at::embedding(get(parameters_, "embed_positions.weight"), context.positions + 2);
  }

  torch::Tensor token_embedding() const override {
    return get(parameters_, "embed_tokens.weight");
  }

 private:
  Parameters parameters_;
};

class OptBlock final : public Block {
 public:
  OptBlock(const ModelConfig& config, std::int64_t index)
      : config_(config),
        parameters_(register_block(*this, config)),
        part_(block_part(index)),
        adapters_(make_adapters(config, part_)) {}

  torch::Tensor forward(const torch::Tensor& hidden, const StepContext& context) override {
    const bool pre_norm = config_.do_layer_norm_before;
    const double residual_rate = context.dropout.rates.residual;
    torch::Tensor h = pre_norm ? norm(hidden, "self_attn_layer_norm") : hidden;
    torch::Tensor attended =
        attention(split_heads(linear(h, parameters_, "self_attn.q_proj", adapters_, context), config_.head_dim),
                  split_heads(linear(h, parameters_, "self_attn.k_proj", adapters_, context), config_.head_dim),
                  split_heads(linear(h, parameters_, "self_attn.v_proj", adapters_, context), config_.head_dim),
                  context, part_, kAttentionSite);
    h = hidden + dropout(linear(merge_heads(attended), parameters_, "self_attn.out_proj", adapters_, context), residual_rate, context,
                         part_, kAttentionOutputSite);
    if (!pre_norm) {
      h = norm(h, "self_attn_layer_norm");
    }
    torch::Tensor residual = h;
    if (pre_norm) {
      h = norm(h, "final_layer_norm");
    }
    h = linear(activate(linear(h, parameters_, "fc1", adapters_, context), config_.activation), parameters_, "fc2", adapters_, context);
    h = residual + dropout(h, residual_rate, context, part_, kMlpOutputSite);
    return pre_norm ? h : norm(h, "final_layer_norm");
  }

 private:
  torch::Tensor norm(const torch::Tensor& x, const std::string& name) const {
    return layer_norm(x, parameters_, name, config_.norm_eps);
  }

  ModelConfig config_;
  Parameters parameters_;
  std::int64_t part_;
  Adapters adapters_;
};

class OptHead final : public Head {
 public:
  OptHead(const ModelConfig& config, const Stem& stem)
      : config_(config),
        parameters_(register_base(*this, config, config.head_parameters())),
        lm_head_(config.tie_word_embeddings ? stem.token_embedding()
                                            : get(parameters_, "lm_head.weight")) {}

  torch::Tensor forward(const torch::Tensor& hidden, const StepContext& context) override {
    torch::Tensor h = hidden;
    if (config_.do_layer_norm_before) {
      h = layer_norm(h, parameters_, "final_layer_norm", config_.norm_eps);
    }
    if (parameters_.count("project_out.weight") != 0) {
      h = linear(h, parameters_, "project_out");
    }
    return at::linear(h, lm_head_);
  }

 private:
  ModelConfig config_;
  Parameters parameters_;
  torch::Tensor lm_head_;
};

class LlamaStem final : public Stem {
 public:
  explicit LlamaStem(const ModelConfig& config)
      : parameters_(register_base(*this, config, config.stem_parameters())) {}

  torch::Tensor forward(const torch::Tensor& tokens, const StepContext& context) override {
    return at::embedding(get(parameters_, "embed_tokens.weight"), tokens);
  }

  torch::Tensor token_embedding() const override {
    return get(parameters_, "embed_tokens.weight");
  }

 private:
  Parameters parameters_;
};

class LlamaBlock final : public Block {
 public:
  LlamaBlock(const ModelConfig& config, std::int64_t index)
      : config_(config),
        parameters_(register_block(*this, config)),
        part_(block_part(index)),
        adapters_(make_adapters(config, part_)) {}

  torch::Tensor forward(const torch::Tensor& hidden, const StepContext& context) override {
    FERRY_CHECK(context.rope_cos.defined(),
                "a LLaMA-family block needs RoPE tables in its StepContext; build the context "
                "with LayeredModel::make_context");
    torch::Tensor h = rms_norm(hidden, get(parameters_, "input_layernorm.weight"),
                               config_.norm_eps);
    // [seq, head_dim] shared by every row, or [batch, seq, head_dim] when positions restart.
    torch::Tensor cos = context.rope_cos.dim() == 3 ? context.rope_cos.unsqueeze(1)
                                                    : context.rope_cos.view({1, 1, -1, config_.head_dim});
    torch::Tensor sin = context.rope_sin.dim() == 3 ? context.rope_sin.unsqueeze(1)
                                                    : context.rope_sin.view({1, 1, -1, config_.head_dim});
    torch::Tensor q = apply_rotary(
        split_heads(linear(h, parameters_, "self_attn.q_proj", adapters_, context), config_.head_dim), cos, sin);
    torch::Tensor k = apply_rotary(
        split_heads(linear(h, parameters_, "self_attn.k_proj", adapters_, context), config_.head_dim), cos, sin);
    torch::Tensor v = split_heads(linear(h, parameters_, "self_attn.v_proj", adapters_, context), config_.head_dim);
    torch::Tensor x =
        hidden + linear(merge_heads(attention(q, k, v, context, part_, kAttentionSite)), parameters_,
                        "self_attn.o_proj", adapters_, context);
    h = rms_norm(x, get(parameters_, "post_attention_layernorm.weight"), config_.norm_eps);
    torch::Tensor gated = activate(linear(h, parameters_, "mlp.gate_proj", adapters_, context), config_.activation) *
                          linear(h, parameters_, "mlp.up_proj", adapters_, context);
    return x + linear(gated, parameters_, "mlp.down_proj", adapters_, context);
  }

 private:
  ModelConfig config_;
  Parameters parameters_;
  std::int64_t part_;
  Adapters adapters_;
};

class LlamaHead final : public Head {
 public:
  LlamaHead(const ModelConfig& config, const Stem& stem)
      : config_(config),
        parameters_(register_base(*this, config, config.head_parameters())),
        lm_head_(config.tie_word_embeddings ? stem.token_embedding()
                                            : get(parameters_, "lm_head.weight")) {}

  torch::Tensor forward(const torch::Tensor& hidden, const StepContext& context) override {
    return at::linear(rms_norm(hidden, get(parameters_, "norm.weight"), config_.norm_eps),
                      lm_head_);
  }

 private:
  ModelConfig config_;
  Parameters parameters_;
  torch::Tensor lm_head_;
};

// A model's random draws: one generator for its tensors in order, and for each tensor of more
// than kChunkedDraws elements chunks drawn side by side.
//
// Note: CPU generators draw on one thread; a 70B-shaped model's tens of billions of values took
// minutes so. A large tensor's chunk c draws from its own generator, seeded from the model's seed,
// the tensor's place among the large ones and c: as deterministic, whatever the thread count.
// Tensors up to kChunkedDraws (every tiny test model's) draw from the one generator as before.
class Draws {
 public:
  static constexpr std::int64_t kChunkedDraws = std::int64_t{1} << 22;

  Draws(std::uint64_t seed, std::uint64_t stream)
      : generator_(at::detail::createCPUGenerator(seed ^ stream)), seed_(seed ^ stream) {}

  template <typename Draw>
  void fill(torch::Tensor& values, Draw draw) {
    const std::int64_t numel = values.numel();
    if (numel <= kChunkedDraws) return draw(values, generator_);
    const std::uint64_t tensor = large_tensors_++;
    torch::Tensor flat = values.view({-1});
    const std::int64_t chunks = (numel + kChunkedDraws - 1) / kChunkedDraws;
    at::parallel_for(0, chunks, 1, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t c = begin; c < end; ++c) {
        at::Generator own = at::detail::createCPUGenerator(mix(seed_, tensor, static_cast<std::uint64_t>(c)));
        torch::Tensor chunk = flat.narrow(0, c * kChunkedDraws, std::min(kChunkedDraws, numel - c * kChunkedDraws));
        draw(chunk, own);
      }
    });
  }

 private:
  // splitmix64's finaliser over the three.
  static std::uint64_t mix(std::uint64_t seed, std::uint64_t tensor, std::uint64_t chunk) {
    std::uint64_t z = seed + 0x9E3779B97F4A7C15ull * (1 + tensor) + 0xBF58476D1CE4E5B9ull * (1 + chunk);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }

  at::Generator generator_;
  const std::uint64_t seed_;
  std::uint64_t large_tensors_ = 0;
};

void initialize_part(torch::nn::Module& part, const std::vector<ParameterSpec>& specs,
                     const ModelConfig& config, Draws& draws) {
  torch::NoGradGuard no_grad;
  auto named = part.named_parameters();
  const double init_std = config.initializer_range;
  auto normal = [&](torch::Tensor& values, double std) {
    draws.fill(values, [std](torch::Tensor& out, at::Generator& generator) { out.normal_(0.0, std, generator); });
  };
  for (const ParameterSpec& spec : specs) {
    const torch::Tensor* parameter = named.find(spec.name);
    FERRY_CHECK(parameter != nullptr, "cannot initialise '", spec.name,
                "': the module does not register it; was it built from this config?");
    torch::Tensor values = torch::empty(spec.shape, torch::kFloat);
    switch (spec.init) {
      case Init::kNormal:
        normal(values, init_std);
        break;
      case Init::kResidualNormal:
        normal(values, init_std / std::sqrt(2.0 * config.num_layers));
        break;
      case Init::kEmbedding:
        normal(values, init_std);
        if (config.pad_token_id >= 0 && config.pad_token_id < spec.shape[0]) {
          values[config.pad_token_id].zero_();
        }
        break;
      case Init::kZeros:
        values.zero_();
        break;
      case Init::kOnes:
        values.fill_(1.0);
        break;
      case Init::kKaimingUniform: {
        // kaiming_uniform_(a = sqrt(5)): gain sqrt(2 / (1 + a^2)) times sqrt(3 / fan_in).
        const double bound = 1.0 / std::sqrt(static_cast<double>(spec.shape[1]));
        draws.fill(values, [bound](torch::Tensor& out, at::Generator& generator) { out.uniform_(-bound, bound, generator); });
        break;
      }
    }
    parameter->copy_(values);
  }
}

}  // namespace

std::shared_ptr<Stem> make_stem(const ModelConfig& config) {
  config.validate();
  switch (config.family) {
    case Family::kGpt2:
      return std::make_shared<Gpt2Stem>(config);
    case Family::kOpt:
      return std::make_shared<OptStem>(config);
    case Family::kLlama:
      return std::make_shared<LlamaStem>(config);
  }
  FERRY_ASSERT(false, "unknown family");
  return nullptr;
}

std::shared_ptr<Block> make_block(const ModelConfig& config, std::int64_t index) {
  config.validate();
  switch (config.family) {
    case Family::kGpt2:
      return std::make_shared<Gpt2Block>(config, index);
    case Family::kOpt:
      return std::make_shared<OptBlock>(config, index);
    case Family::kLlama:
      return std::make_shared<LlamaBlock>(config, index);
  }
  FERRY_ASSERT(false, "unknown family");
  return nullptr;
}

std::shared_ptr<Head> make_head(const ModelConfig& config, const Stem& stem) {
  config.validate();
  FERRY_CHECK(!config.tie_word_embeddings || stem.token_embedding().defined(),
              "tie_word_embeddings is set but the stem has no token embedding to share");
  switch (config.family) {
    case Family::kGpt2:
      return std::make_shared<Gpt2Head>(config, stem);
    case Family::kOpt:
      return std::make_shared<OptHead>(config, stem);
    case Family::kLlama:
      return std::make_shared<LlamaHead>(config, stem);
  }
  FERRY_ASSERT(false, "unknown family");
  return nullptr;
}

ContextOptions make_context_options(const ModelConfig& config) {
  ContextOptions options;
  if (config.family == Family::kLlama) {
    options.rope = std::make_shared<const RotaryEmbedding>(config.head_dim, config.rope_theta,
                                                           config.rope_scaling);
    options.sliding_window = config.sliding_window;
  }
  options.positions_from_padding_mask = config.family == Family::kOpt;
  options.dropout = config.dropout;
  return options;
}

LayeredModel allocate(const ModelConfig& config) {
  config.validate();
  std::shared_ptr<Stem> stem = make_stem(config);
  std::vector<std::shared_ptr<Block>> blocks;
  blocks.reserve(static_cast<std::size_t>(config.num_layers));
  for (std::int64_t i = 0; i < config.num_layers; ++i) {
    blocks.push_back(make_block(config, i));
  }
  std::shared_ptr<Head> head = make_head(config, *stem);
  return LayeredModel(std::move(stem), std::move(blocks), std::move(head),
                      make_context_options(config), causal_lm_loss, config);
}

void initialize(LayeredModel& model, std::uint64_t seed) {
  FERRY_CHECK(model.config().has_value(),
              "initialize() follows a built-in family's scheme; this model was assembled by hand "
              "and has no ModelConfig");
  const ModelConfig& config = *model.config();
  Draws draws(seed, 0);
  initialize_part(*model.stem(), config.stem_parameters(), config, draws);
  for (const auto& block : model.blocks()) {
    initialize_part(*block, config.block_parameters(), config, draws);
  }
  initialize_part(*model.head(), config.head_parameters(), config, draws);
  if (config.lora.enabled()) initialize_adapters(model, seed);
}

void initialize_adapters(LayeredModel& model, std::uint64_t seed) {
  FERRY_CHECK(model.config().has_value() && model.config()->lora.enabled(),
              "initialize_adapters(): the model has no LoRA adapters (ModelConfig::lora.rank is 0)");
  const ModelConfig& config = *model.config();
  // Its own stream, so that the base is drawn as it is without adapters.
  Draws draws(seed, 0x4c6f5241u);
  for (const auto& block : model.blocks()) initialize_part(*block, config.lora_parameters(), config, draws);
}

LayeredModel build(const ModelConfig& config, std::uint64_t seed) {
  LayeredModel model = allocate(config);
  initialize(model, seed);
  return model;
}

}  // namespace ferry::models
