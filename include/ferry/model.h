#pragma once

// The layered model: the contract the engine drives block by block (docs/architecture.md, layer 5).
//
//   tokens --stem--> hidden --block 0--> ... --block N-1--> hidden --head--> logits --loss
//
// Every part is a torch::nn::Module whose parameters are registered once, in a stable order,
// under Hugging Face names relative to the part ("self_attn.q_proj.weight"). The engine packs a
// part's parameters into one bundle and rebinds each with `parameter.set_data(view)`; the model
// never learns where its tensors live. Built-in families (GPT-2, OPT, LLaMA/Mistral/Qwen2) are
// built from a ModelConfig; a user can assemble a LayeredModel from modules of their own
// (examples/custom_model.cpp).

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <torch/nn/module.h>
#include <torch/types.h>

#include "ferry/dtype.h"
#include "ferry/model_config.h"
#include "ferry/safetensors.h"

namespace ferry {

// Labels equal to this are ignored by the loss (transformers' and torch's convention).
inline constexpr std::int64_t kIgnoreIndex = -100;

// Which dropout masks a forward pass draws: none unless `training`. Each mask's generator is
// seeded from (seed, step, micro_batch, part, site), so a block recomputed in backward draws the
// masks of its forward again, and a step draws the same masks in every placement and mode.
struct DropoutContext {
  bool training = false;
  std::uint64_t seed = 0;
  std::int64_t step = 0;
  std::int64_t micro_batch = 0;
  models::DropoutRates rates;
};

// What every part sees during one forward pass. Built once per step by
// LayeredModel::make_context and shared, read-only, by the stem, each block and the head; the
// engine keeps it for recomputing blocks in backward.
struct StepContext {
  torch::Tensor positions;       // [batch, seq] int64; -1 at padding when counted from the mask
  torch::Tensor attention_mask;  // [batch or 1, 1, seq, seq] bool, true where a query may see a
                                 // key; undefined means plain causal attention
  torch::Tensor rope_cos;        // in the model dtype: [seq, head_dim], or [batch, seq, head_dim]
  torch::Tensor rope_sin;        // when positions restart within a row; undefined without RoPE
  DropoutContext dropout;
};

// Token (and position) embeddings: tokens [batch, seq] int64 -> hidden [batch, seq, dim].
class Stem : public torch::nn::Module {
 public:
  virtual torch::Tensor forward(const torch::Tensor& tokens, const StepContext& context) = 0;

  // The token embedding [vocab, dim] that a tied head multiplies by; undefined when none.
  virtual torch::Tensor token_embedding() const { return {}; }
};

// hidden [batch, seq, hidden] -> hidden [batch, seq, hidden].
class Block : public torch::nn::Module {
 public:
  virtual torch::Tensor forward(const torch::Tensor& hidden, const StepContext& context) = 0;
};

// Final norm and LM head: hidden [batch, seq, hidden] -> logits [batch, seq, vocab].
class Head : public torch::nn::Module {
 public:
  virtual torch::Tensor forward(const torch::Tensor& hidden, const StepContext& context) = 0;
};

// Rotary position embedding tables, computed in fp32 as transformers does and cached per
// (device, dtype). Thread-safe.
class RotaryEmbedding {
 public:
  RotaryEmbedding(std::int64_t head_dim, double theta, models::RopeScaling scaling = {});

  std::int64_t head_dim() const { return head_dim_; }
  const torch::Tensor& inverse_frequencies() const { return inverse_frequencies_; }  // [head_dim/2]

  // cos and sin for positions 0..seq_len-1: [seq_len, head_dim] each.
  std::pair<torch::Tensor, torch::Tensor> cos_sin(std::int64_t seq_len, torch::Device device,
                                                  torch::ScalarType dtype) const;

 private:
  struct Table {
    torch::Tensor cos;
    torch::Tensor sin;
  };

  std::int64_t head_dim_;
  torch::Tensor inverse_frequencies_;
  mutable std::mutex mutex_;
  mutable std::map<std::pair<std::string, int>, Table> tables_;
};

// transformers' inv_freq for rope_type default, linear and llama3 (fp32, CPU).
torch::Tensor rope_inverse_frequencies(std::int64_t head_dim, double theta,
                                       const models::RopeScaling& scaling);

// x * cos + rotate_half(x) * sin for x [batch, heads, seq, head_dim].
torch::Tensor apply_rotary(const torch::Tensor& x, const torch::Tensor& cos,
                           const torch::Tensor& sin);

// softmax(q k^T / sqrt(head_dim) + mask) v for q [batch, heads, seq, head_dim] and k, v with
// heads / kv_heads fewer heads (grouped-query attention). Uses scaled_dot_product_attention
// where the LibTorch version has it, else the same formula in plain ops with an fp32 softmax.
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const StepContext& context);
// The same with dropout on the attention probabilities (context.dropout.rates.attention), drawn as
// dropout() draws it; without training or at rate 0 it is attention() above.
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const StepContext& context, std::int64_t part, int site);

// x with each element zeroed with probability p and the rest scaled by 1 / (1 - p), as
// torch.nn.functional.dropout, from the generator that (context.dropout, part, site) seeds; x itself
// when not training or p is 0. `part` is the stem 0, block i i + 1, the head num_blocks + 1; `site`
// tells the dropouts of one part apart.
torch::Tensor dropout(const torch::Tensor& x, double p, const StepContext& context, std::int64_t part, int site);

// Mean cross-entropy over the labels that are not kIgnoreIndex, computed in fp32. Logits
// [batch, seq, vocab] at position t predict labels[t + 1]; the shift happens here. Zero when
// every label is ignored. Without a gradient to compute, the sequences go through in groups of at
// most models::kLossGroupLogits logits (one sequence at least): small fp32 temporaries.
torch::Tensor causal_lm_loss(const torch::Tensor& logits, const torch::Tensor& labels);

// Labels for supervised fine-tuning: the tokens, with kIgnoreIndex where prompt_mask is true
// (and where padding_mask, if given, is false), so only the answer is learned.
torch::Tensor answer_only_labels(const torch::Tensor& tokens, const torch::Tensor& prompt_mask,
                                 const torch::Tensor& padding_mask = {});

// Whether AdamW weight decay skips a parameter: biases and norm weights (anything below 2-D).
bool is_no_decay(const std::string& name, const torch::Tensor& parameter);

torch::ScalarType to_scalar_type(DType dtype);
DType to_dtype(torch::ScalarType scalar_type);

// How make_context prepares a step for the blocks of a model.
struct ContextOptions {
  std::shared_ptr<const RotaryEmbedding> rope;  // fills rope_cos/rope_sin when set
  bool positions_from_padding_mask = false;     // OPT: positions count real tokens only
  std::int64_t sliding_window = 0;              // a query sees this many keys, itself included; 0: all
  models::DropoutRates dropout;                 // copied into each StepContext
};

using LossFunction =
    std::function<torch::Tensor(const torch::Tensor& logits, const torch::Tensor& labels)>;

class LayeredModel {
 public:
  LayeredModel(std::shared_ptr<Stem> stem, std::vector<std::shared_ptr<Block>> blocks,
               std::shared_ptr<Head> head, ContextOptions context_options = {},
               LossFunction loss = causal_lm_loss,
               std::optional<models::ModelConfig> config = std::nullopt);

  const std::shared_ptr<Stem>& stem() const { return stem_; }
  const std::vector<std::shared_ptr<Block>>& blocks() const { return blocks_; }
  const std::shared_ptr<Head>& head() const { return head_; }
  std::size_t num_blocks() const { return blocks_.size(); }

  // Set for the built-in families; nullopt for a model assembled by hand.
  const std::optional<models::ModelConfig>& config() const { return config_; }
  const ContextOptions& context_options() const { return context_options_; }

  // tokens [batch, seq] int64; padding_mask [batch, seq], true (or 1) at real tokens, optional;
  // position_ids [batch, seq], optional: where they restart at 0 within a row a new document
  // starts, which sees none of the row before it (a block-diagonal causal mask), and positions
  // (and RoPE angles) count from its start. Dropout is off in the context this returns (the
  // engine turns it on for training forwards).
  StepContext make_context(const torch::Tensor& tokens, const torch::Tensor& padding_mask = {},
                           const torch::Tensor& position_ids = {}) const;

  // Every dropout of the model at this rate, in place of the rates its config gave.
  void set_dropout(double rate);

  // The whole model in one call (the engine drives the parts itself): logits [batch, seq, vocab].
  torch::Tensor forward(const torch::Tensor& tokens, const torch::Tensor& padding_mask = {},
                        const torch::Tensor& position_ids = {}) const;
  torch::Tensor loss(const torch::Tensor& logits, const torch::Tensor& labels) const;

  // Parameters of stem, blocks and head in that order, each part in registration order.
  std::vector<torch::Tensor> parameters() const;
  std::int64_t parameter_count() const;

  // The dtype of the stem's first parameter: the dtype of hidden states and RoPE tables.
  torch::ScalarType dtype() const;
  torch::Device device() const;

  void to(torch::Device device);
  void to(torch::Device device, torch::ScalarType dtype);
  void train(bool on = true);

 private:
  std::shared_ptr<Stem> stem_;
  std::vector<std::shared_ptr<Block>> blocks_;
  std::shared_ptr<Head> head_;
  ContextOptions context_options_;
  LossFunction loss_;
  std::optional<models::ModelConfig> config_;
};

namespace models {

// The parts of a built-in family. Parameters are allocated (in config.dtype, on the CPU) but
// not initialised: fill them with initialize(), a checkpoint, or rebind them to bundle views.
std::shared_ptr<Stem> make_stem(const ModelConfig& config);
// `index` is the block's place in the model, which tells its dropout masks from other blocks'.
std::shared_ptr<Block> make_block(const ModelConfig& config, std::int64_t index);
// A tied head multiplies by stem.token_embedding() and owns no lm_head parameter.
std::shared_ptr<Head> make_head(const ModelConfig& config, const Stem& stem);
ContextOptions make_context_options(const ModelConfig& config);

// A whole model with parameters allocated, uninitialised.
LayeredModel allocate(const ModelConfig& config);

// Random initialisation following the family's transformers _init_weights, deterministic for a
// seed: normal(0, initializer_range) for weights and embeddings (the padding row zeroed), GPT-2's
// c_proj scaled by 1/sqrt(2 * num_layers), zero biases, unit norms.
void initialize(LayeredModel& model, std::uint64_t seed);

// LoRA's adapters alone, as PEFT initialises them (A Kaiming-uniform, B zero), deterministic for
// a seed; initialize() calls it after drawing the base. Throws for a model without adapters.
void initialize_adapters(LayeredModel& model, std::uint64_t seed);

// allocate() then initialize().
LayeredModel build(const ModelConfig& config, std::uint64_t seed);

enum class Part { kStem, kBlock, kHead };

// The name PEFT saves a block's adapter under in adapter_model.safetensors: (LLaMA, 3,
// "self_attn.q_proj.lora_A.weight") -> "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight".
std::string peft_name(const ModelConfig& config, std::int64_t block, const std::string& local_name);

// W + scale * B A for the weight of a linear that `target` names, as PEFT's merge computes it
// (transposed for GPT-2's Conv1D); the result in fp32.
torch::Tensor merge_lora(const ModelConfig& config, const LoraTarget& target, const torch::Tensor& weight,
                         const torch::Tensor& lora_a, const torch::Tensor& lora_b);

// The Hugging Face name of a part's parameter, e.g. (LLaMA, kBlock, 3, "self_attn.q_proj.weight")
// -> "model.layers.3.self_attn.q_proj.weight"; (GPT-2, kStem, 0, "wte.weight") ->
// "transformer.wte.weight". `block` is ignored for the stem and the head.
std::string hf_name(const ModelConfig& config, Part part, std::int64_t block,
                    const std::string& local_name);

// A Hugging Face model directory (config.json and safetensors, sharded or not), opened and
// fully validated: every parameter the config needs is present with the right shape and a float
// dtype, and every tensor in the checkpoint is accounted for. Reading is then per parameter or
// per part, straight into wherever the parameter lives (a bundle view, a GPU tensor), so a
// model larger than host memory can be streamed block by block.
class PretrainedReader {
 public:
  explicit PretrainedReader(const std::string& dir);

  const ModelConfig& config() const { return config_; }
  const safetensors::Checkpoint& checkpoint() const { return checkpoint_; }

  // The checkpoint tensor that a parameter is read from.
  const std::string& source_of(Part part, std::int64_t block, const std::string& local_name) const;

  // Reads one parameter into dst. When dst is a contiguous CPU tensor of the checkpoint's dtype
  // the bytes go straight into it; otherwise they are staged and converted with copy_().
  void read_into(Part part, std::int64_t block, const std::string& local_name,
                 const torch::Tensor& dst) const;

  // Reads every parameter of a part (stem, block `block`, or head) into module's parameters.
  void read_part(Part part, std::int64_t block, torch::nn::Module& module) const;

 private:
  std::string dir_;
  ModelConfig config_;
  safetensors::Checkpoint checkpoint_;
  std::map<std::string, std::string> source_;  // hf_name -> name in the checkpoint
};

struct LoadOptions {
  std::optional<DType> dtype;  // parameter dtype; default: config.json's torch_dtype, else F32
  // Adapters over the loaded base (ModelConfig::lora), initialised from `seed`.
  LoraConfig lora;
  std::uint64_t seed = 0;
};

LayeredModel from_pretrained(const std::string& dir, const LoadOptions& options = {});

inline constexpr std::uint64_t kDefaultMaxShardBytes = 5'000'000'000;  // transformers' "5GB"

// Writes config.json and safetensors with Hugging Face names (a tied lm_head is not stored), so
// that transformers' from_pretrained loads the directory. Built-in families only.
void save_pretrained(const LayeredModel& model, const std::string& dir,
                     std::uint64_t max_shard_bytes = kDefaultMaxShardBytes);

}  // namespace models
}  // namespace ferry
