// Hugging Face checkpoints: parameter names mapped between ferry's parts and transformers'
// modules, config.json, and safetensors read straight into parameters.

#include <cstdio>
#include <fstream>
#include <set>

#include <ATen/ATen.h>

#include "ferry/check.h"
#include "ferry/fs.h"
#include "ferry/io.h"
#include "ferry/model.h"

namespace ferry::models {
namespace {

// Where a family's parts sit in transformers' module tree.
struct HfLayout {
  std::string base;        // prefix of stem and head names
  std::string alias_base;  // the same prefix in checkpoints saved from the bare base model
  std::string layers;      // blocks: base + layers + index + "."
};

HfLayout layout(Family family) {
  switch (family) {
    case Family::kGpt2:
      return {"transformer.", "", "h."};
    case Family::kOpt:
      return {"model.decoder.", "decoder.", "layers."};
    case Family::kLlama:
      return {"model.", "model.", "layers."};
  }
  FERRY_ASSERT(false, "unknown family");
  return {};
}

bool starts_with(const std::string& text, const std::string& prefix) {
  return text.compare(0, prefix.size(), prefix) == 0;
}

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Tensors that transformers may store but that are not parameters: GPT-2's causal-mask
// buffers, old rotary inv_freq buffers, and a tied lm_head.
bool is_ignorable(const ModelConfig& config, const std::string& name) {
  if (config.family == Family::kGpt2 &&
      (ends_with(name, ".attn.bias") || ends_with(name, ".attn.masked_bias"))) {
    return true;
  }
  if (ends_with(name, "rotary_emb.inv_freq")) {
    return true;
  }
  return config.tie_word_embeddings && name == "lm_head.weight";
}

std::string describe_shape(const std::vector<std::int64_t>& shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    text += (i == 0 ? "" : ", ") + std::to_string(shape[i]);
  }
  return text + "]";
}

std::string first_names(const std::vector<std::string>& names) {
  constexpr std::size_t kShown = 8;
  std::string text;
  for (std::size_t i = 0; i < names.size() && i < kShown; ++i) {
    text += (i == 0 ? "" : ", ") + names[i];
  }
  if (names.size() > kShown) {
    text += ", ... (" + std::to_string(names.size() - kShown) + " more)";
  }
  return text;
}

std::vector<ParameterSpec> specs_of(const ModelConfig& config, Part part) {
  switch (part) {
    case Part::kStem:
      return config.stem_parameters();
    case Part::kBlock:
      return config.block_parameters();
    case Part::kHead:
      return config.head_parameters();
  }
  FERRY_ASSERT(false, "unknown part");
  return {};
}

}  // namespace

std::string hf_name(const ModelConfig& config, Part part, std::int64_t block,
                    const std::string& local_name) {
  const HfLayout names = layout(config.family);
  if (part == Part::kBlock) {
    return names.base + names.layers + std::to_string(block) + "." + local_name;
  }
  if (part == Part::kHead && starts_with(local_name, "lm_head.")) {
    return local_name;
  }
  return names.base + local_name;
}

PretrainedReader::PretrainedReader(const std::string& dir)
    : dir_(dir),
      config_(ModelConfig::from_hf_file(dir + "/config.json")),
      checkpoint_(dir) {
  const HfLayout names = layout(config_.family);
  std::vector<std::string> missing;
  std::set<std::string> used;
  auto expect = [&](Part part, std::int64_t block) {
    for (const ParameterSpec& spec : specs_of(config_, part)) {
      const std::string canonical = hf_name(config_, part, block, spec.name);
      std::string found = canonical;
      if (!checkpoint_.contains(found) && starts_with(canonical, names.base)) {
        found = names.alias_base + canonical.substr(names.base.size());
      }
      if (!checkpoint_.contains(found)) {
        missing.push_back(canonical);
        continue;
      }
      const safetensors::TensorInfo& info = checkpoint_.tensor(found);
      FERRY_CHECK(info.shape == spec.shape, checkpoint_.file_of(found), ": tensor '", found,
                  "' has shape ", describe_shape(info.shape), " but ", dir,
                  "/config.json needs ", describe_shape(spec.shape));
      FERRY_CHECK(info.dtype == DType::kF32 || info.dtype == DType::kBF16 ||
                      info.dtype == DType::kF16 || info.dtype == DType::kF64,
                  checkpoint_.file_of(found), ": tensor '", found, "' has dtype ",
                  dtype_name(info.dtype), " (valid for parameters: F32, BF16, F16, F64)");
      source_[canonical] = found;
      used.insert(found);
    }
  };
  expect(Part::kStem, 0);
  for (std::int64_t block = 0; block < config_.num_layers; ++block) {
    expect(Part::kBlock, block);
  }
  expect(Part::kHead, 0);
  FERRY_CHECK(missing.empty(), dir, ": the checkpoint lacks ", missing.size(),
              " tensors that config.json needs: ", first_names(missing));

  std::vector<std::string> unexpected;
  for (const std::string& name : checkpoint_.names()) {
    if (used.count(name) == 0 && !is_ignorable(config_, name)) {
      unexpected.push_back(name);
    }
  }
  FERRY_CHECK(unexpected.empty(), dir, ": the checkpoint has ", unexpected.size(),
              " tensors that a ", config_.model_type, " model with this config.json does not have",
              " (wrong model_type or num_hidden_layers?): ", first_names(unexpected));
}

const std::string& PretrainedReader::source_of(Part part, std::int64_t block,
                                               const std::string& local_name) const {
  const std::string canonical = hf_name(config_, part, block, local_name);
  auto found = source_.find(canonical);
  FERRY_CHECK(found != source_.end(), dir_, ": no parameter '", canonical, "' in a ",
              config_.model_type, " model with ", config_.num_layers, " layers");
  return found->second;
}

void PretrainedReader::read_into(Part part, std::int64_t block, const std::string& local_name,
                                 const torch::Tensor& dst) const {
  const std::string& name = source_of(part, block, local_name);
  const safetensors::TensorInfo& info = checkpoint_.tensor(name);
  FERRY_CHECK(dst.sizes().vec() == info.shape, checkpoint_.file_of(name), ": tensor '", name,
              "' has shape ", describe_shape(info.shape), " but the destination has shape ",
              dst.sizes());
  torch::NoGradGuard no_grad;
  const torch::ScalarType stored = to_scalar_type(info.dtype);
  if (dst.device().is_cpu() && dst.is_contiguous() && dst.scalar_type() == stored) {
    checkpoint_.read_into(name, dst.data_ptr(), info.bytes());
    return;
  }
  torch::Tensor staging = torch::empty(info.shape, stored);
  checkpoint_.read_into(name, staging.data_ptr(), info.bytes());
  dst.copy_(staging);
}

void PretrainedReader::read_part(Part part, std::int64_t block, torch::nn::Module& module) const {
  auto parameters = module.named_parameters();
  const std::vector<ParameterSpec> specs = specs_of(config_, part);
  FERRY_CHECK(parameters.size() >= specs.size(), "the module has ", parameters.size(),
              " parameters but a ", config_.model_type, " part of this config has ", specs.size());
  for (const ParameterSpec& spec : specs) {
    const torch::Tensor* parameter = parameters.find(spec.name);
    FERRY_CHECK(parameter != nullptr, "the module has no parameter '", spec.name,
                "' that a ", config_.model_type, " part registers");
    read_into(part, block, spec.name, *parameter);
  }
}

LayeredModel from_pretrained(const std::string& dir, const LoadOptions& options) {
  PretrainedReader reader(dir);
  ModelConfig config = reader.config();
  if (options.dtype.has_value()) {
    config.dtype = *options.dtype;
  }
  config.lora = options.lora;
  LayeredModel model = allocate(config);
  reader.read_part(Part::kStem, 0, *model.stem());
  for (std::size_t block = 0; block < model.num_blocks(); ++block) {
    reader.read_part(Part::kBlock, static_cast<std::int64_t>(block), *model.blocks()[block]);
  }
  reader.read_part(Part::kHead, 0, *model.head());
  if (config.lora.enabled()) initialize_adapters(model, options.seed);
  return model;
}

std::string peft_name(const ModelConfig& config, std::int64_t block, const std::string& local_name) {
  return "base_model.model." + hf_name(config, Part::kBlock, block, local_name);
}

torch::Tensor merge_lora(const ModelConfig& config, const LoraTarget& target, const torch::Tensor& weight,
                         const torch::Tensor& lora_a, const torch::Tensor& lora_b) {
  torch::NoGradGuard no_grad;
  torch::Tensor delta = torch::matmul(lora_b.to(torch::kFloat), lora_a.to(torch::kFloat)) * config.lora.scale();
  if (target.fan_in_fan_out) delta = delta.t();
  return weight.to(torch::kFloat) + delta;
}

void save_pretrained(const LayeredModel& model, const std::string& dir,
                     std::uint64_t max_shard_bytes) {
  FERRY_CHECK(model.config().has_value(),
              "save_pretrained writes Hugging Face checkpoints of built-in families; this model "
              "was assembled by hand (write its tensors with safetensors::write_file instead)");
  ModelConfig config = *model.config();
  config.dtype = to_dtype(model.dtype());
  fs::make_directories(dir);

  std::vector<torch::Tensor> host_copies;
  std::vector<safetensors::TensorView> views;
  auto add = [&](Part part, std::int64_t block, const torch::nn::Module& module) {
    for (const auto& item : module.named_parameters()) {
      torch::Tensor host = item.value().detach().to(torch::kCPU).contiguous();
      views.push_back({hf_name(config, part, block, item.key()), to_dtype(host.scalar_type()),
                       host.sizes().vec(), host.data_ptr()});
      host_copies.push_back(std::move(host));
    }
  };
  add(Part::kStem, 0, *model.stem());
  for (std::size_t block = 0; block < model.num_blocks(); ++block) {
    add(Part::kBlock, static_cast<std::int64_t>(block), *model.blocks()[block]);
  }
  add(Part::kHead, 0, *model.head());
  safetensors::write_checkpoint(dir, views, max_shard_bytes);
  write_file_durably(Env::posix(), dir + "/config.json", config.to_hf_json());
}

}  // namespace ferry::models
