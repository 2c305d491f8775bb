#include "ferry/model_config.h"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <utility>

#include <nlohmann/json.hpp>

#include "ferry/check.h"

namespace ferry::models {
namespace {

using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;

// Typed access to config.json fields. A null value counts as absent, as transformers does for
// fields like n_inner or head_dim.
class Fields {
 public:
  Fields(const Json& root, const std::string& file) : root_(root), file_(file) {}

  bool has(const char* key) const {
    auto found = root_.find(key);
    return found != root_.end() && !found->is_null();
  }

  std::int64_t integer(const char* key, std::int64_t fallback) const {
    if (!has(key)) {
      return fallback;
    }
    const Json& value = root_.at(key);
    FERRY_CHECK(value.is_number_integer(), file_, ": field ", key, " must be an integer, got ",
                value.dump());
    return value.get<std::int64_t>();
  }

  double number(const char* key, double fallback) const {
    if (!has(key)) {
      return fallback;
    }
    const Json& value = root_.at(key);
    FERRY_CHECK(value.is_number(), file_, ": field ", key, " must be a number, got ",
                value.dump());
    return value.get<double>();
  }

  bool boolean(const char* key, bool fallback) const {
    if (!has(key)) {
      return fallback;
    }
    const Json& value = root_.at(key);
    FERRY_CHECK(value.is_boolean(), file_, ": field ", key, " must be true or false, got ",
                value.dump());
    return value.get<bool>();
  }

  std::string string(const char* key, const std::string& fallback) const {
    if (!has(key)) {
      return fallback;
    }
    const Json& value = root_.at(key);
    FERRY_CHECK(value.is_string(), file_, ": field ", key, " must be a string, got ",
                value.dump());
    return value.get<std::string>();
  }

  const std::string& file() const { return file_; }

 private:
  const Json& root_;
  const std::string& file_;
};

Activation parse_activation(const Fields& fields, const char* key, const std::string& fallback) {
  const std::string name = fields.string(key, fallback);
  if (name == "gelu_new" || name == "gelu_pytorch_tanh") {
    return Activation::kGeluTanh;
  }
  if (name == "relu") {
    return Activation::kRelu;
  }
  if (name == "silu" || name == "swish") {
    return Activation::kSilu;
  }
  FERRY_CHECK(false, fields.file(), ": field ", key, " is '", name,
              "', which ferry does not implement (valid: gelu_new, gelu_pytorch_tanh, relu, silu)");
  return Activation::kSilu;
}

std::string activation_name(Activation activation) {
  switch (activation) {
    case Activation::kGeluTanh:
      return "gelu_new";
    case Activation::kRelu:
      return "relu";
    case Activation::kSilu:
      return "silu";
  }
  FERRY_ASSERT(false, "unknown activation");
  return "";
}

DType parse_torch_dtype(const Fields& fields) {
  const char* key = fields.has("dtype") ? "dtype" : "torch_dtype";
  const std::string name = fields.string(key, "float32");
  if (name == "bfloat16") {
    return DType::kBF16;
  }
  if (name == "float16") {
    return DType::kF16;
  }
  FERRY_CHECK(name == "float32", fields.file(), ": field ", key, " is '", name,
              "' (valid: float32, bfloat16, float16)");
  return DType::kF32;
}

std::string torch_dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
      return "bfloat16";
    case DType::kF16:
      return "float16";
    default:
      return "float32";
  }
}

// A probability field: 0 to below 1.
double probability(const Fields& fields, const char* key, double fallback) {
  const double value = fields.number(key, fallback);
  FERRY_CHECK(value >= 0 && value < 1, fields.file(), ": field ", key, " is ", value, " (valid: 0 <= p < 1)");
  return value;
}

// bos_token_id and eos_token_id, where eos may be a list (Llama-3 instruct models end on any of
// several). A null or missing field is none.
void parse_token_ids(const Fields& fields, const Json& root, ModelConfig* config) {
  config->bos_token_id = fields.integer("bos_token_id", -1);
  if (!fields.has("eos_token_id")) return;
  const Json& eos = root.at("eos_token_id");
  if (eos.is_array()) {
    for (const Json& id : eos) {
      FERRY_CHECK(id.is_number_integer(), fields.file(), ": field eos_token_id must be an id or a list of ids, got ",
                  eos.dump());
      config->eos_token_ids.push_back(id.get<std::int64_t>());
    }
  } else {
    config->eos_token_ids.push_back(fields.integer("eos_token_id", -1));
  }
}

// The required fields are checked by name so that a config.json without, say, hidden_size
// fails here rather than producing a model of transformers' default size by accident.
void require(const Fields& fields, std::initializer_list<const char*> keys) {
  for (const char* key : keys) {
    FERRY_CHECK(fields.has(key), fields.file(), ": missing required field ", key);
  }
}

ModelConfig parse_gpt2(const Fields& fields) {
  require(fields, {"vocab_size", "n_embd", "n_layer", "n_head"});
  ModelConfig config;
  config.family = Family::kGpt2;
  config.model_type = "gpt2";
  config.vocab_size = fields.integer("vocab_size", 50257);
  config.max_position_embeddings = fields.integer("n_positions", 1024);
  config.hidden_size = fields.integer("n_embd", 768);
  config.num_layers = fields.integer("n_layer", 12);
  config.num_heads = fields.integer("n_head", 12);
  config.num_kv_heads = config.num_heads;
  config.head_dim = config.num_heads > 0 ? config.hidden_size / config.num_heads : 0;
  config.intermediate_size = fields.integer("n_inner", 4 * config.hidden_size);
  config.activation = parse_activation(fields, "activation_function", "gelu_new");
  config.norm_eps = fields.number("layer_norm_epsilon", 1e-5);
  config.initializer_range = fields.number("initializer_range", 0.02);
  config.tie_word_embeddings = fields.boolean("tie_word_embeddings", true);
  config.dropout.embedding = probability(fields, "embd_pdrop", 0.1);
  config.dropout.attention = probability(fields, "attn_pdrop", 0.1);
  config.dropout.residual = probability(fields, "resid_pdrop", 0.1);
  FERRY_CHECK(fields.boolean("scale_attn_weights", true), fields.file(),
              ": scale_attn_weights=false is not supported (valid: true)");
  FERRY_CHECK(!fields.boolean("scale_attn_by_inverse_layer_idx", false), fields.file(),
              ": scale_attn_by_inverse_layer_idx=true is not supported (valid: false)");
  return config;
}

ModelConfig parse_opt(const Fields& fields) {
  require(fields, {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "ffn_dim"});
  ModelConfig config;
  config.family = Family::kOpt;
  config.model_type = "opt";
  config.vocab_size = fields.integer("vocab_size", 50272);
  config.hidden_size = fields.integer("hidden_size", 768);
  config.num_layers = fields.integer("num_hidden_layers", 12);
  config.num_heads = fields.integer("num_attention_heads", 12);
  config.num_kv_heads = config.num_heads;
  config.head_dim = config.num_heads > 0 ? config.hidden_size / config.num_heads : 0;
  config.intermediate_size = fields.integer("ffn_dim", 3072);
  config.max_position_embeddings = fields.integer("max_position_embeddings", 2048);
  config.do_layer_norm_before = fields.boolean("do_layer_norm_before", true);
  config.word_embed_proj_dim = fields.integer("word_embed_proj_dim", config.hidden_size);
  config.activation = parse_activation(fields, "activation_function", "relu");
  config.initializer_range = fields.number("init_std", 0.02);
  config.tie_word_embeddings = fields.boolean("tie_word_embeddings", true);
  config.pad_token_id = fields.integer("pad_token_id", 1);
  config.norm_eps = 1e-5;
  config.dropout.attention = probability(fields, "attention_dropout", 0.0);
  config.dropout.residual = probability(fields, "dropout", 0.1);
  FERRY_CHECK(fields.number("layerdrop", 0.0) == 0.0, fields.file(), ": layerdrop=", fields.number("layerdrop", 0.0),
              " is not supported (valid: 0)");
  FERRY_CHECK(fields.boolean("enable_bias", true), fields.file(),
              ": enable_bias=false is not supported (valid: true)");
  FERRY_CHECK(fields.boolean("layer_norm_elementwise_affine", true), fields.file(),
              ": layer_norm_elementwise_affine=false is not supported (valid: true)");
  FERRY_CHECK(!fields.boolean("_remove_final_layer_norm", false), fields.file(),
              ": _remove_final_layer_norm=true is not supported (valid: false)");
  return config;
}

void parse_rope(const Fields& fields, const Json& root, ModelConfig* config) {
  // transformers 5 keeps theta and scaling together in rope_parameters; 4.x had rope_theta and
  // rope_scaling at the top level.
  const Json* scaling = nullptr;
  config->rope_theta = fields.number("rope_theta", 10000.0);
  if (fields.has("rope_parameters")) {
    scaling = &root.at("rope_parameters");
    FERRY_CHECK(scaling->is_object(), fields.file(), ": field rope_parameters must be an object");
    Fields rope(*scaling, fields.file());
    config->rope_theta = rope.number("rope_theta", config->rope_theta);
  } else if (fields.has("rope_scaling")) {
    scaling = &root.at("rope_scaling");
    FERRY_CHECK(scaling->is_object(), fields.file(), ": field rope_scaling must be an object");
  }
  if (scaling == nullptr) {
    return;
  }
  Fields rope(*scaling, fields.file());
  RopeScaling& out = config->rope_scaling;
  out.type = rope.string("rope_type", rope.string("type", "default"));
  FERRY_CHECK(out.type == "default" || out.type == "linear" || out.type == "llama3",
              fields.file(), ": rope type '", out.type,
              "' is not supported (valid: default, linear, llama3)");
  out.factor = rope.number("factor", 1.0);
  out.low_freq_factor = rope.number("low_freq_factor", 1.0);
  out.high_freq_factor = rope.number("high_freq_factor", 4.0);
  out.original_max_position_embeddings =
      rope.integer("original_max_position_embeddings", config->max_position_embeddings);
}

ModelConfig parse_llama_family(const Fields& fields, const Json& root,
                               const std::string& model_type) {
  require(fields, {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "intermediate_size"});
  ModelConfig config;
  config.family = Family::kLlama;
  config.model_type = model_type;
  config.vocab_size = fields.integer("vocab_size", 32000);
  config.hidden_size = fields.integer("hidden_size", 4096);
  config.num_layers = fields.integer("num_hidden_layers", 32);
  config.num_heads = fields.integer("num_attention_heads", 32);
  config.num_kv_heads = fields.integer("num_key_value_heads", config.num_heads);
  if (!fields.has("head_dim")) {
    FERRY_CHECK(config.num_heads > 0 && config.hidden_size % config.num_heads == 0, fields.file(),
                ": hidden_size ", config.hidden_size, " is not divisible by num_attention_heads ",
                config.num_heads, " (and head_dim is not given)");
  }
  config.head_dim = fields.integer(
      "head_dim", config.num_heads > 0 ? config.hidden_size / config.num_heads : 0);
  config.intermediate_size = fields.integer("intermediate_size", 11008);
  config.max_position_embeddings = fields.integer("max_position_embeddings", 2048);
  config.norm_eps = fields.number("rms_norm_eps", 1e-6);
  config.initializer_range = fields.number("initializer_range", 0.02);
  config.activation = parse_activation(fields, "hidden_act", "silu");
  config.tie_word_embeddings = fields.boolean("tie_word_embeddings", false);
  config.pad_token_id = fields.integer("pad_token_id", -1);
  config.dropout.attention = probability(fields, "attention_dropout", 0.0);
  parse_rope(fields, root, &config);
  if (model_type == "llama") {
    config.qkv_bias = fields.boolean("attention_bias", false);
    config.attention_out_bias = config.qkv_bias;
    config.mlp_bias = fields.boolean("mlp_bias", false);
  } else if (model_type == "qwen2") {
    config.qkv_bias = true;
    FERRY_CHECK(!fields.boolean("use_sliding_window", false), fields.file(),
                ": use_sliding_window=true is not supported for qwen2 (valid: false)");
  } else {
    config.sliding_window = fields.has("sliding_window") ? fields.integer("sliding_window", 0)
                            : root.contains("sliding_window") ? 0
                                                              : 4096;
  }
  return config;
}

std::int64_t total(const std::vector<ParameterSpec>& specs) {
  std::int64_t count = 0;
  for (const ParameterSpec& spec : specs) {
    count += spec.numel();
  }
  return count;
}

void add_layer_norm(std::vector<ParameterSpec>* specs, const std::string& name, std::int64_t size) {
  specs->push_back({name + ".weight", {size}, Init::kOnes});
  specs->push_back({name + ".bias", {size}, Init::kZeros});
}

// A torch.nn.Linear: weight [out, in].
void add_linear(std::vector<ParameterSpec>* specs, const std::string& name, std::int64_t in,
                std::int64_t out, bool bias) {
  specs->push_back({name + ".weight", {out, in}, Init::kNormal});
  if (bias) {
    specs->push_back({name + ".bias", {out}, Init::kZeros});
  }
}

// GPT-2's Conv1D: weight [in, out].
void add_conv1d(std::vector<ParameterSpec>* specs, const std::string& name, std::int64_t in,
                std::int64_t out, Init init) {
  specs->push_back({name + ".weight", {in, out}, init});
  specs->push_back({name + ".bias", {out}, Init::kZeros});
}

}  // namespace

std::int64_t ParameterSpec::numel() const {
  std::int64_t count = 1;
  for (std::int64_t dim : shape) {
    count *= dim;
  }
  return count;
}

void ModelConfig::validate() const {
  const char* type = model_type.c_str();
  FERRY_CHECK(vocab_size > 0, type, " config: vocab_size must be positive, got ", vocab_size);
  FERRY_CHECK(hidden_size > 0, type, " config: hidden_size must be positive, got ", hidden_size);
  FERRY_CHECK(num_layers > 0, type, " config: num_hidden_layers must be positive, got ",
              num_layers);
  FERRY_CHECK(num_heads > 0, type, " config: num_attention_heads must be positive, got ",
              num_heads);
  FERRY_CHECK(intermediate_size > 0, type, " config: intermediate size must be positive, got ",
              intermediate_size);
  FERRY_CHECK(max_position_embeddings > 0, type,
              " config: max_position_embeddings must be positive, got ", max_position_embeddings);
  FERRY_CHECK(norm_eps > 0, type, " config: the norm epsilon must be positive, got ", norm_eps);
  FERRY_CHECK(dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16, type,
              " config: dtype ", dtype_name(dtype), " is not a parameter dtype (valid: F32, BF16, F16)");
  if (family != Family::kLlama) {
    FERRY_CHECK(hidden_size % num_heads == 0, type, " config: hidden_size ", hidden_size,
                " is not divisible by num_attention_heads ", num_heads);
    FERRY_CHECK(head_dim == hidden_size / num_heads && num_kv_heads == num_heads, type,
                " config: head_dim must be hidden_size / num_attention_heads = ",
                hidden_size / num_heads, ", got ", head_dim);
  } else {
    FERRY_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, type,
                " config: num_attention_heads ", num_heads,
                " is not divisible by num_key_value_heads ", num_kv_heads);
    FERRY_CHECK(head_dim > 0 && head_dim % 2 == 0, type, " config: head_dim must be even and ",
                "positive for rotary embeddings, got ", head_dim,
                " (hidden_size / num_attention_heads when head_dim is absent)");
    FERRY_CHECK(rope_theta > 0, type, " config: rope_theta must be positive, got ", rope_theta);
    FERRY_CHECK(rope_scaling.factor > 0, type, " config: rope scaling factor must be positive, got ",
                rope_scaling.factor);
    if (rope_scaling.type == "llama3") {
      FERRY_CHECK(rope_scaling.high_freq_factor > rope_scaling.low_freq_factor, type,
                  " config: llama3 rope scaling needs high_freq_factor > low_freq_factor, got ",
                  rope_scaling.high_freq_factor, " and ", rope_scaling.low_freq_factor);
      FERRY_CHECK(rope_scaling.original_max_position_embeddings > 0, type,
                  " config: original_max_position_embeddings must be positive, got ",
                  rope_scaling.original_max_position_embeddings);
    }
    FERRY_CHECK(sliding_window >= 0, type, " config: sliding_window must be >= 0, got ",
                sliding_window);
  }
  if (family == Family::kOpt) {
    FERRY_CHECK(word_embed_proj_dim > 0, type, " config: word_embed_proj_dim must be positive, got ",
                word_embed_proj_dim);
  }
  FERRY_CHECK(pad_token_id < vocab_size, type, " config: pad_token_id ", pad_token_id,
              " is not below vocab_size ", vocab_size);
  FERRY_CHECK(lora.rank >= 0, "lora rank = ", lora.rank, " is invalid: use a positive rank, or 0 for no adapters");
  lora_targets();  // checks the adapters' settings
}

std::int64_t ModelConfig::embed_dim() const {
  return family == Family::kOpt && word_embed_proj_dim > 0 ? word_embed_proj_dim : hidden_size;
}

std::vector<ParameterSpec> ModelConfig::stem_parameters() const {
  std::vector<ParameterSpec> specs;
  switch (family) {
    case Family::kGpt2:
      specs.push_back({"wte.weight", {vocab_size, hidden_size}, Init::kEmbedding});
      specs.push_back({"wpe.weight", {max_position_embeddings, hidden_size}, Init::kNormal});
      break;
    case Family::kOpt:
      specs.push_back({"embed_tokens.weight", {vocab_size, embed_dim()}, Init::kEmbedding});
      // Note: OPT's learned positions are offset by 2, so the table has two extra rows.
      specs.push_back(
          {"embed_positions.weight", {max_position_embeddings + 2, hidden_size}, Init::kNormal});
      if (embed_dim() != hidden_size) {
        add_linear(&specs, "project_in", embed_dim(), hidden_size, false);
      }
      break;
    case Family::kLlama:
      specs.push_back({"embed_tokens.weight", {vocab_size, hidden_size}, Init::kEmbedding});
      break;
  }
  return specs;
}

std::vector<ParameterSpec> ModelConfig::block_parameters() const {
  std::vector<ParameterSpec> specs;
  const std::int64_t hidden = hidden_size;
  switch (family) {
    case Family::kGpt2:
      add_layer_norm(&specs, "ln_1", hidden);
      add_conv1d(&specs, "attn.c_attn", hidden, 3 * hidden, Init::kNormal);
      add_conv1d(&specs, "attn.c_proj", hidden, hidden, Init::kResidualNormal);
      add_layer_norm(&specs, "ln_2", hidden);
      add_conv1d(&specs, "mlp.c_fc", hidden, intermediate_size, Init::kNormal);
      add_conv1d(&specs, "mlp.c_proj", intermediate_size, hidden, Init::kResidualNormal);
      break;
    case Family::kOpt:
      add_layer_norm(&specs, "self_attn_layer_norm", hidden);
      add_linear(&specs, "self_attn.q_proj", hidden, hidden, true);
      add_linear(&specs, "self_attn.k_proj", hidden, hidden, true);
      add_linear(&specs, "self_attn.v_proj", hidden, hidden, true);
      add_linear(&specs, "self_attn.out_proj", hidden, hidden, true);
      add_layer_norm(&specs, "final_layer_norm", hidden);
      add_linear(&specs, "fc1", hidden, intermediate_size, true);
      add_linear(&specs, "fc2", intermediate_size, hidden, true);
      break;
    case Family::kLlama:
      specs.push_back({"input_layernorm.weight", {hidden}, Init::kOnes});
      add_linear(&specs, "self_attn.q_proj", hidden, num_heads * head_dim, qkv_bias);
      add_linear(&specs, "self_attn.k_proj", hidden, num_kv_heads * head_dim, qkv_bias);
      add_linear(&specs, "self_attn.v_proj", hidden, num_kv_heads * head_dim, qkv_bias);
      add_linear(&specs, "self_attn.o_proj", num_heads * head_dim, hidden, attention_out_bias);
      specs.push_back({"post_attention_layernorm.weight", {hidden}, Init::kOnes});
      add_linear(&specs, "mlp.gate_proj", hidden, intermediate_size, mlp_bias);
      add_linear(&specs, "mlp.up_proj", hidden, intermediate_size, mlp_bias);
      add_linear(&specs, "mlp.down_proj", intermediate_size, hidden, mlp_bias);
      break;
  }
  return specs;
}

std::vector<ParameterSpec> ModelConfig::head_parameters() const {
  std::vector<ParameterSpec> specs;
  switch (family) {
    case Family::kGpt2:
      add_layer_norm(&specs, "ln_f", hidden_size);
      break;
    case Family::kOpt:
      if (do_layer_norm_before) {
        add_layer_norm(&specs, "final_layer_norm", hidden_size);
      }
      if (embed_dim() != hidden_size) {
        add_linear(&specs, "project_out", hidden_size, embed_dim(), false);
      }
      break;
    case Family::kLlama:
      specs.push_back({"norm.weight", {hidden_size}, Init::kOnes});
      break;
  }
  if (!tie_word_embeddings) {
    add_linear(&specs, "lm_head", embed_dim(), vocab_size, false);
  }
  return specs;
}

namespace {

// ferry's short target names, per family; GPT-2's fused c_attn has no q, k or v of its own.
std::string short_target(Family family, const std::string& name) {
  static const std::map<std::string, std::string> llama = {
      {"q", "q_proj"}, {"k", "k_proj"}, {"v", "v_proj"}, {"o", "o_proj"},
      {"gate", "gate_proj"}, {"up", "up_proj"}, {"down", "down_proj"}};
  static const std::map<std::string, std::string> opt = {
      {"q", "q_proj"}, {"k", "k_proj"}, {"v", "v_proj"}, {"o", "out_proj"}, {"up", "fc1"}, {"down", "fc2"}};
  static const std::map<std::string, std::string> gpt2 = {{"o", "attn.c_proj"}, {"up", "c_fc"}, {"down", "mlp.c_proj"}};
  const auto& table = family == Family::kLlama ? llama : family == Family::kOpt ? opt : gpt2;
  auto found = table.find(name);
  return found == table.end() ? name : found->second;
}

bool ends_with_module(const std::string& module, const std::string& name) {
  if (module == name) return true;
  return module.size() > name.size() && module.compare(module.size() - name.size(), name.size(), name) == 0 &&
         module[module.size() - name.size() - 1] == '.';
}

}  // namespace

std::vector<LoraTarget> ModelConfig::lora_candidates() const {
  std::vector<LoraTarget> candidates;
  const std::string suffix = ".weight";
  for (const ParameterSpec& spec : block_parameters()) {
    if (spec.shape.size() != 2) continue;  // every 2-D parameter of a block is a linear's weight
    LoraTarget target;
    target.module = spec.name.substr(0, spec.name.size() - suffix.size());
    target.fan_in_fan_out = family == Family::kGpt2;
    target.in = spec.shape[target.fan_in_fan_out ? 0 : 1];
    target.out = spec.shape[target.fan_in_fan_out ? 1 : 0];
    candidates.push_back(std::move(target));
  }
  return candidates;
}

std::vector<LoraTarget> ModelConfig::lora_targets() const {
  if (!lora.enabled()) return {};
  FERRY_CHECK(lora.alpha > 0, "lora alpha = ", lora.alpha, " is invalid: it must be positive (PEFT's default is 8)");
  FERRY_CHECK(lora.dropout >= 0 && lora.dropout < 1, "lora dropout = ", lora.dropout,
              " is invalid: it must be in [0, 1)");
  FERRY_CHECK(!lora.targets.empty(), "lora targets are empty: name the linears to adapt, or \"all-linear\"");
  const std::vector<LoraTarget> candidates = lora_candidates();
  std::vector<bool> chosen(candidates.size(), false);
  for (const std::string& target : lora.targets) {
    bool matched = false;
    for (std::size_t i = 0; i < candidates.size(); ++i) {
      if (target == "all-linear" || ends_with_module(candidates[i].module, short_target(family, target))) {
        chosen[i] = matched = true;
      }
    }
    if (!matched) {
      std::string valid = "all-linear";
      for (const LoraTarget& candidate : candidates) valid += ", " + candidate.module;
      const std::string& example = candidates.front().module;
      FERRY_CHECK(false, "lora target '", target, "' matches no linear of a ", model_type, " block (valid: ", valid,
                  ", or the last part of one, such as ", example.substr(example.find_last_of('.') + 1), ")");
    }
  }
  std::vector<LoraTarget> targets;
  for (std::size_t i = 0; i < candidates.size(); ++i) {
    if (chosen[i]) targets.push_back(candidates[i]);
  }
  return targets;
}

std::vector<ParameterSpec> ModelConfig::lora_parameters() const {
  std::vector<ParameterSpec> specs;
  for (const LoraTarget& target : lora_targets()) {
    specs.push_back({target.module + ".lora_A.weight", {lora.rank, target.in}, Init::kKaimingUniform});
    specs.push_back({target.module + ".lora_B.weight", {target.out, lora.rank}, Init::kZeros});
  }
  return specs;
}

std::int64_t ModelConfig::lora_parameter_count() const { return total(lora_parameters()); }

std::int64_t ModelConfig::stem_parameter_count() const { return total(stem_parameters()); }
std::int64_t ModelConfig::block_parameter_count() const { return total(block_parameters()); }
std::int64_t ModelConfig::head_parameter_count() const { return total(head_parameters()); }

std::int64_t ModelConfig::parameter_count() const {
  return stem_parameter_count() + num_layers * block_parameter_count() + head_parameter_count();
}

std::uint64_t ModelConfig::block_bytes() const {
  return static_cast<std::uint64_t>(block_parameter_count()) * dtype_size(dtype);
}

ModelConfig ModelConfig::from_hf_json(const std::string& json_text, const std::string& file) {
  Json root = Json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  FERRY_CHECK(!root.is_discarded() && root.is_object(), file, ": not a JSON object");
  Fields fields(root, file);
  FERRY_CHECK(fields.has("model_type"), file,
              ": missing required field model_type (valid: gpt2, opt, llama, mistral, qwen2)");
  const std::string model_type = fields.string("model_type", "");
  ModelConfig config;
  if (model_type == "gpt2") {
    config = parse_gpt2(fields);
  } else if (model_type == "opt") {
    config = parse_opt(fields);
  } else if (model_type == "llama" || model_type == "mistral" || model_type == "qwen2") {
    config = parse_llama_family(fields, root, model_type);
  } else {
    FERRY_CHECK(false, file, ": model_type '", model_type,
                "' is not supported (valid: gpt2, opt, llama, mistral, qwen2)");
  }
  config.dtype = parse_torch_dtype(fields);
  parse_token_ids(fields, root, &config);
  try {
    config.validate();
  } catch (const Error& error) {
    throw Error(file + ": " + error.what());
  }
  return config;
}

ModelConfig ModelConfig::from_hf_file(const std::string& path) {
  std::ifstream stream(path);
  FERRY_CHECK(stream.good(), "cannot read ", path);
  std::stringstream text;
  text << stream.rdbuf();
  return from_hf_json(text.str(), path);
}

std::string ModelConfig::to_hf_json() const {
  OrderedJson out;
  switch (family) {
    case Family::kGpt2:
      out["architectures"] = {"GPT2LMHeadModel"};
      out["model_type"] = "gpt2";
      out["vocab_size"] = vocab_size;
      out["n_positions"] = max_position_embeddings;
      out["n_embd"] = hidden_size;
      out["n_layer"] = num_layers;
      out["n_head"] = num_heads;
      out["n_inner"] = intermediate_size;
      out["activation_function"] = activation_name(activation);
      out["layer_norm_epsilon"] = norm_eps;
      out["initializer_range"] = initializer_range;
      out["embd_pdrop"] = dropout.embedding;
      out["attn_pdrop"] = dropout.attention;
      out["resid_pdrop"] = dropout.residual;
      break;
    case Family::kOpt:
      out["architectures"] = {"OPTForCausalLM"};
      out["model_type"] = "opt";
      out["vocab_size"] = vocab_size;
      out["hidden_size"] = hidden_size;
      out["num_hidden_layers"] = num_layers;
      out["num_attention_heads"] = num_heads;
      out["ffn_dim"] = intermediate_size;
      out["max_position_embeddings"] = max_position_embeddings;
      out["do_layer_norm_before"] = do_layer_norm_before;
      out["word_embed_proj_dim"] = embed_dim();
      out["activation_function"] = activation_name(activation);
      out["init_std"] = initializer_range;
      out["enable_bias"] = true;
      out["pad_token_id"] = pad_token_id;
      out["dropout"] = dropout.residual;
      out["attention_dropout"] = dropout.attention;
      break;
    case Family::kLlama: {
      const std::map<std::string, std::string> architectures = {
          {"llama", "LlamaForCausalLM"}, {"mistral", "MistralForCausalLM"},
          {"qwen2", "Qwen2ForCausalLM"}};
      out["architectures"] = {architectures.at(model_type)};
      out["model_type"] = model_type;
      out["vocab_size"] = vocab_size;
      out["hidden_size"] = hidden_size;
      out["num_hidden_layers"] = num_layers;
      out["num_attention_heads"] = num_heads;
      out["num_key_value_heads"] = num_kv_heads;
      out["head_dim"] = head_dim;
      out["intermediate_size"] = intermediate_size;
      out["max_position_embeddings"] = max_position_embeddings;
      out["rms_norm_eps"] = norm_eps;
      out["hidden_act"] = activation_name(activation);
      out["initializer_range"] = initializer_range;
      // Both spellings: transformers 4.x reads rope_theta and rope_scaling, 5.x
      // rope_parameters; each ignores the other's keys.
      OrderedJson rope = {{"rope_type", rope_scaling.type}};
      if (rope_scaling.type != "default") {
        rope["factor"] = rope_scaling.factor;
      }
      if (rope_scaling.type == "llama3") {
        rope["low_freq_factor"] = rope_scaling.low_freq_factor;
        rope["high_freq_factor"] = rope_scaling.high_freq_factor;
        rope["original_max_position_embeddings"] = rope_scaling.original_max_position_embeddings;
      }
      out["rope_theta"] = rope_theta;
      out["rope_scaling"] = rope_scaling.type == "default" ? OrderedJson(nullptr) : rope;
      rope["rope_theta"] = rope_theta;
      out["rope_parameters"] = rope;
      if (model_type == "llama") {
        out["attention_bias"] = qkv_bias;
        out["mlp_bias"] = mlp_bias;
      }
      if (model_type == "mistral") {
        out["sliding_window"] = sliding_window > 0 ? Json(sliding_window) : Json(nullptr);
      }
      if (model_type == "qwen2") {
        out["use_sliding_window"] = false;
      }
      if (pad_token_id >= 0) {
        out["pad_token_id"] = pad_token_id;
      }
      out["attention_dropout"] = dropout.attention;
      break;
    }
  }
  if (bos_token_id >= 0) out["bos_token_id"] = bos_token_id;
  if (eos_token_ids.size() == 1) out["eos_token_id"] = eos_token_ids.front();
  if (eos_token_ids.size() > 1) out["eos_token_id"] = eos_token_ids;
  out["tie_word_embeddings"] = tie_word_embeddings;
  out["torch_dtype"] = torch_dtype_name(dtype);
  return out.dump(2) + "\n";
}

namespace {

ModelConfig gpt2(std::int64_t hidden, std::int64_t layers, std::int64_t heads,
                 std::int64_t vocab = 50257, std::int64_t positions = 1024) {
  ModelConfig config;
  config.family = Family::kGpt2;
  config.model_type = "gpt2";
  config.vocab_size = vocab;
  config.max_position_embeddings = positions;
  config.hidden_size = hidden;
  config.num_layers = layers;
  config.num_heads = heads;
  config.num_kv_heads = heads;
  config.head_dim = hidden / heads;
  config.intermediate_size = 4 * hidden;
  config.activation = Activation::kGeluTanh;
  config.norm_eps = 1e-5;
  config.tie_word_embeddings = true;
  return config;
}

ModelConfig opt(std::int64_t hidden, std::int64_t layers, std::int64_t heads, std::int64_t ffn,
                std::int64_t vocab = 50272, std::int64_t positions = 2048) {
  ModelConfig config;
  config.family = Family::kOpt;
  config.model_type = "opt";
  config.vocab_size = vocab;
  config.max_position_embeddings = positions;
  config.hidden_size = hidden;
  config.word_embed_proj_dim = hidden;
  config.num_layers = layers;
  config.num_heads = heads;
  config.num_kv_heads = heads;
  config.head_dim = hidden / heads;
  config.intermediate_size = ffn;
  config.activation = Activation::kRelu;
  config.norm_eps = 1e-5;
  config.tie_word_embeddings = true;
  config.pad_token_id = 1;
  return config;
}

ModelConfig llama(const std::string& model_type, std::int64_t hidden, std::int64_t layers,
                  std::int64_t heads, std::int64_t kv_heads, std::int64_t intermediate,
                  std::int64_t vocab, std::int64_t positions, double rope_theta, double eps) {
  ModelConfig config;
  config.family = Family::kLlama;
  config.model_type = model_type;
  config.vocab_size = vocab;
  config.max_position_embeddings = positions;
  config.hidden_size = hidden;
  config.num_layers = layers;
  config.num_heads = heads;
  config.num_kv_heads = kv_heads;
  config.head_dim = hidden / heads;
  config.intermediate_size = intermediate;
  config.activation = Activation::kSilu;
  config.rope_theta = rope_theta;
  config.norm_eps = eps;
  config.qkv_bias = model_type == "qwen2";
  config.sliding_window = model_type == "mistral" ? 4096 : 0;
  return config;
}

ModelConfig with_projection(ModelConfig config, std::int64_t word_embed_proj_dim,
                            bool do_layer_norm_before) {
  config.word_embed_proj_dim = word_embed_proj_dim;
  config.do_layer_norm_before = do_layer_norm_before;
  return config;
}

ModelConfig tied(ModelConfig config) {
  config.tie_word_embeddings = true;
  return config;
}

ModelConfig llama3_scaled(ModelConfig config) {
  config.rope_scaling = {"llama3", 8.0, 1.0, 4.0, 8192};
  return config;
}

using PresetTable = std::map<std::string, std::function<ModelConfig()>>;

const PresetTable& presets() {
  static const PresetTable table = {
      {"gpt2", [] { return gpt2(768, 12, 12); }},
      {"gpt2-medium", [] { return gpt2(1024, 24, 16); }},
      {"gpt2-large", [] { return gpt2(1280, 36, 20); }},
      {"gpt2-xl", [] { return gpt2(1600, 48, 25); }},
      // GPT-3 (Brown et al. 2020) is GPT-2's architecture at 2048 positions. The paper gives
      // 13B a d_model of 5140, which 40 heads do not divide; Megatron-LM, ZeRO-Infinity and Fuyou
      // run it with 5120.
      {"gpt3-13b", [] { return gpt2(5120, 40, 40, 50257, 2048); }},
      {"gpt3-175b", [] { return gpt2(12288, 96, 96, 50257, 2048); }},
      {"opt-125m", [] { return opt(768, 12, 12, 3072); }},
      {"opt-350m", [] { return with_projection(opt(1024, 24, 16, 4096), 512, false); }},
      {"opt-1.3b", [] { return opt(2048, 24, 32, 8192); }},
      {"opt-2.7b", [] { return opt(2560, 32, 32, 10240); }},
      {"opt-6.7b", [] { return opt(4096, 32, 32, 16384); }},
      {"opt-13b", [] { return opt(5120, 40, 40, 20480); }},
      {"opt-30b", [] { return opt(7168, 48, 56, 28672); }},
      {"opt-66b", [] { return opt(9216, 64, 72, 36864); }},
      {"opt-175b", [] { return opt(12288, 96, 96, 49152); }},
      {"llama-1.3b", [] { return llama("llama", 2048, 24, 16, 16, 5504, 32000, 4096, 1e4, 1e-5); }},
      {"llama-2.7b", [] { return llama("llama", 2560, 32, 20, 20, 6912, 32000, 4096, 1e4, 1e-5); }},
      {"llama-6.7b", [] { return llama("llama", 4096, 32, 32, 32, 11008, 32000, 4096, 1e4, 1e-5); }},
      {"llama-7b", [] { return llama("llama", 4096, 32, 32, 32, 11008, 32000, 4096, 1e4, 1e-5); }},
      {"llama-13b", [] { return llama("llama", 5120, 40, 40, 40, 13824, 32000, 4096, 1e4, 1e-5); }},
      {"llama-70b", [] { return llama("llama", 8192, 80, 64, 8, 28672, 32000, 4096, 1e4, 1e-5); }},
      {"llama3-8b",
       [] { return llama("llama", 4096, 32, 32, 8, 14336, 128256, 8192, 5e5, 1e-5); }},
      {"llama3-70b",
       [] { return llama("llama", 8192, 80, 64, 8, 28672, 128256, 8192, 5e5, 1e-5); }},
      {"llama3.1-8b",
       [] {
         return llama3_scaled(
             llama("llama", 4096, 32, 32, 8, 14336, 128256, 131072, 5e5, 1e-5));
       }},
      {"mistral-7b",
       [] { return llama("mistral", 4096, 32, 32, 8, 14336, 32000, 32768, 1e4, 1e-5); }},
      {"qwen2-0.5b",
       [] { return tied(llama("qwen2", 896, 24, 14, 2, 4864, 151936, 32768, 1e6, 1e-6)); }},
      {"qwen2-7b",
       [] { return llama("qwen2", 3584, 28, 28, 4, 18944, 152064, 32768, 1e6, 1e-6); }},
      {"qwen2-72b",
       [] { return llama("qwen2", 8192, 80, 64, 8, 29568, 152064, 32768, 1e6, 1e-6); }},
      {"tiny-gpt2", [] { return gpt2(64, 2, 4, 512, 128); }},
      {"tiny-opt", [] { return with_projection(opt(64, 2, 4, 256, 512, 128), 32, true); }},
      {"tiny-llama", [] { return llama("llama", 64, 2, 4, 2, 172, 512, 256, 1e4, 1e-6); }},
      {"tiny-llama3",
       [] {
         ModelConfig config = llama("llama", 64, 2, 4, 2, 172, 512, 256, 5e5, 1e-5);
         config.rope_scaling = {"llama3", 8.0, 1.0, 4.0, 64};
         return config;
       }},
      {"tiny-mistral",
       [] {
         ModelConfig config = llama("mistral", 64, 2, 4, 1, 160, 512, 256, 1e4, 1e-5);
         config.sliding_window = 8;
         return config;
       }},
      {"tiny-qwen2", [] { return tied(llama("qwen2", 64, 2, 4, 2, 160, 512, 256, 1e6, 1e-6)); }},
  };
  return table;
}

}  // namespace

ModelConfig truncated(ModelConfig config, std::int64_t layers) {
  if (layers == 0) return config;
  FERRY_CHECK(layers >= 1 && layers <= config.num_layers, "layers = ", layers, " is invalid for a model of ",
              config.num_layers, " blocks: use 1 to ", config.num_layers, ", or 0 for all of them");
  config.num_layers = layers;
  return config;
}

ModelConfig preset(const std::string& name) {
  auto found = presets().find(name);
  if (found == presets().end()) {
    std::string valid;
    for (const std::string& candidate : preset_names()) {
      valid += (valid.empty() ? "" : ", ") + candidate;
    }
    FERRY_CHECK(false, "unknown model preset '", name, "' (valid: ", valid, ")");
  }
  ModelConfig config = found->second();
  config.validate();
  return config;
}

std::vector<std::string> preset_names() {
  std::vector<std::string> names;
  for (const auto& entry : presets()) {
    names.push_back(entry.first);
  }
  return names;
}

std::string format_parameter_count(std::int64_t count) {
  static const struct {
    double scale;
    const char* format;
  } kScales[] = {{1e9, "%.2fB"}, {1e6, "%.2fM"}, {1e3, "%.1fK"}};
  char text[32];
  for (const auto& scale : kScales) {
    if (static_cast<double>(count) >= scale.scale) {
      std::snprintf(text, sizeof text, scale.format, static_cast<double>(count) / scale.scale);
      return text;
    }
  }
  std::snprintf(text, sizeof text, "%lld", static_cast<long long>(count));
  return text;
}

}  // namespace ferry::models
