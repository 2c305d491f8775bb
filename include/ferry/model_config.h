#pragma once

// The shape of a built-in model family, read from a Hugging Face config.json or a named preset.
// Free of torch: the planner sizes a 175B model from a ModelConfig without allocating anything.

#include <cstdint>
#include <string>
#include <vector>

#include "ferry/dtype.h"

namespace ferry::models {

// causal_lm_loss without a gradient: the most logits one group of sequences takes through its
// fp32 temporaries (ferry/model.h).
inline constexpr std::int64_t kLossGroupLogits = std::int64_t{1} << 26;

// LLaMA covers Mistral and Qwen2: the same block with different biases, defaults and masks.
enum class Family { kGpt2, kOpt, kLlama };

enum class Activation {
  kGeluTanh,  // "gelu_new": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
  kRelu,
  kSilu,
};

// How a parameter is drawn by random initialisation, following each family's _init_weights.
enum class Init {
  kNormal,          // normal(0, initializer_range)
  kResidualNormal,  // GPT-2 c_proj: normal(0, initializer_range / sqrt(2 * num_layers))
  kEmbedding,       // normal(0, initializer_range), row pad_token_id zeroed when set
  kZeros,           // biases
  kOnes,            // norm weights
  kKaimingUniform,  // LoRA's A: torch's kaiming_uniform_(a = sqrt(5)), U(-1/sqrt(fan_in), 1/sqrt(fan_in))
};

struct ParameterSpec {
  std::string name;  // Hugging Face name relative to its part: "self_attn.q_proj.weight"
  std::vector<std::int64_t> shape;
  Init init = Init::kNormal;

  std::int64_t numel() const;
};

// Rotary position embedding frequencies (transformers' rope_type "default", "linear", "llama3").
struct RopeScaling {
  std::string type = "default";
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  std::int64_t original_max_position_embeddings = 8192;
};

// Dropout rates as a family's config.json gives them; 0 where the family has no such dropout.
struct DropoutRates {
  double embedding = 0;  // after the embeddings: GPT-2's embd_pdrop
  double attention = 0;  // on the attention probabilities: GPT-2's attn_pdrop, attention_dropout elsewhere
  double residual = 0;   // on each sublayer's output before its residual add: GPT-2's resid_pdrop, OPT's dropout
  bool any() const { return embedding > 0 || attention > 0 || residual > 0; }
};

// LoRA (Hu et al. 2021) as PEFT applies it: each targeted linear of every block gains
// adapters A [rank, in] and B [out, rank] and computes W x + b + scale * B A dropout(x), with
// scale = alpha / rank; the base weights are frozen. A is drawn as torch's kaiming_uniform_ with
// a = sqrt(5) draws it, B starts at zero, so training starts from the base model.
struct LoraConfig {
  std::int64_t rank = 0;  // 0: no adapters
  double alpha = 8;       // PEFT's default lora_alpha
  double dropout = 0;     // on the adapters' input only
  // PEFT's target_modules: names of the blocks' linears ("q_proj", "self_attn.o_proj": a module
  // matches a name it ends with), ferry's short names q, k, v, o, gate, up, down, or "all-linear":
  // every linear of the blocks (never the LM head).
  std::vector<std::string> targets = {"all-linear"};

  bool enabled() const { return rank > 0; }
  double scale() const { return alpha / static_cast<double>(rank); }
};

// One linear of a block that LoRA may adapt.
struct LoraTarget {
  std::string module;  // relative to the block: "self_attn.q_proj"
  std::int64_t in = 0;
  std::int64_t out = 0;
  bool fan_in_fan_out = false;  // GPT-2's Conv1D keeps its weight as [in, out]
};

struct ModelConfig {
  Family family = Family::kLlama;
  std::string model_type = "llama";  // "gpt2", "opt", "llama", "mistral", "qwen2"
  std::int64_t vocab_size = 0;
  std::int64_t hidden_size = 0;
  std::int64_t num_layers = 0;
  std::int64_t num_heads = 0;
  std::int64_t num_kv_heads = 0;
  std::int64_t head_dim = 0;
  std::int64_t intermediate_size = 0;
  std::int64_t max_position_embeddings = 0;
  double norm_eps = 1e-5;
  double initializer_range = 0.02;
  Activation activation = Activation::kSilu;
  bool tie_word_embeddings = false;
  std::int64_t pad_token_id = -1;  // -1: none
  // config.json's bos_token_id and eos_token_id (one or a list), written back on export.
  std::int64_t bos_token_id = -1;  // -1: none
  std::vector<std::int64_t> eos_token_ids;
  DropoutRates dropout;

  // LLaMA family.
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool qkv_bias = false;          // Qwen2, LLaMA attention_bias
  bool attention_out_bias = false;  // LLaMA attention_bias
  bool mlp_bias = false;
  std::int64_t sliding_window = 0;  // Mistral; 0: full causal attention

  // OPT.
  bool do_layer_norm_before = true;
  std::int64_t word_embed_proj_dim = 0;  // 0: equal to hidden_size

  DType dtype = DType::kF32;  // parameter dtype: F32, BF16 or F16

  // Adapters on the blocks' linears, and every other parameter frozen; off by default. Not part
  // of config.json: a job's setting, applied to a base model.
  LoraConfig lora;

  // Throws ferry::Error naming the field when the shape is inconsistent (heads that do not
  // divide hidden_size, kv heads that do not divide heads, a dtype that is not F32/BF16/F16...).
  void validate() const;

  std::int64_t embed_dim() const;  // OPT's word_embed_proj_dim, else hidden_size

  // The parameters of each part, in the order its module registers them.
  std::vector<ParameterSpec> stem_parameters() const;
  std::vector<ParameterSpec> block_parameters() const;  // identical for every block
  std::vector<ParameterSpec> head_parameters() const;
  // The blocks' linears LoRA may adapt, and those lora.targets selects (each target must match
  // one: an error lists the valid names otherwise); empty without LoRA.
  std::vector<LoraTarget> lora_candidates() const;
  std::vector<LoraTarget> lora_targets() const;
  // Each adapted linear's "<module>.lora_A.weight" and "<module>.lora_B.weight", registered by
  // each block after block_parameters(); empty without LoRA.
  std::vector<ParameterSpec> lora_parameters() const;

  std::int64_t stem_parameter_count() const;
  std::int64_t block_parameter_count() const;
  std::int64_t head_parameter_count() const;
  std::int64_t parameter_count() const;  // stem + num_layers blocks + head
  std::int64_t lora_parameter_count() const;  // one block's adapters
  std::uint64_t block_bytes() const;     // block_parameter_count() in dtype

  // Parses a Hugging Face config.json (text); `file` names it in errors. Missing fields take
  // transformers' defaults for the model_type; unsupported ones are rejected by name.
  static ModelConfig from_hf_json(const std::string& json_text, const std::string& file);
  static ModelConfig from_hf_file(const std::string& path);

  // A config.json that transformers loads as this model.
  std::string to_hf_json() const;
};

// Named presets with the public architectures' shapes, plus tiny-* test sizes that run in
// milliseconds. Throws, listing the valid names, for an unknown one.
ModelConfig preset(const std::string& name);
// The same model cut to its first `layers` blocks, every other dimension kept: blocks of a model
// too large for a machine, run there to measure them (`--layers`). 0 keeps them all; throws for
// a count outside 1 to the model's.
ModelConfig truncated(ModelConfig config, std::int64_t layers);
std::vector<std::string> preset_names();

// Parameter counts as people write them: "156.5K", "1.35B", "13.02B".
std::string format_parameter_count(std::int64_t count);

}  // namespace ferry::models
