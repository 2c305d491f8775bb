// Hugging Face checkpoints: save_pretrained / from_pretrained, streaming a block into a bundle,
// and every way a checkpoint directory can be wrong.

#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "ferry/check.h"
#include "ferry/model.h"
#include "ferry/safetensors.h"
#include "support/temp_dir.h"

// glog, which LibTorch includes, defines a CHECK macro of its own; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

using namespace ferry;
using models::ModelConfig;
using models::Part;
using models::preset;
using Catch::Matchers::Contains;

namespace {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

NamedTensors read_all(const std::string& dir) {
  safetensors::Checkpoint checkpoint(dir);
  NamedTensors tensors;
  for (const std::string& name : checkpoint.names()) {
    const auto& info = checkpoint.tensor(name);
    torch::Tensor tensor = torch::empty(info.shape, to_scalar_type(info.dtype));
    checkpoint.read_into(name, tensor.data_ptr(), info.bytes());
    tensors.emplace_back(name, tensor);
  }
  return tensors;
}

void write_all(const std::string& dir, const NamedTensors& tensors) {
  std::vector<safetensors::TensorView> views;
  for (const auto& [name, tensor] : tensors) {
    views.push_back({name, to_dtype(tensor.scalar_type()), tensor.sizes().vec(), tensor.data_ptr()});
  }
  safetensors::write_checkpoint(dir, views, models::kDefaultMaxShardBytes);
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream stream(path);
  return nlohmann::json::parse(stream);
}

void write_json(const std::string& path, const nlohmann::json& json) {
  std::ofstream(path, std::ios::trunc) << json.dump(2);
}

torch::Tensor tokens_for(const ModelConfig& config) {
  torch::manual_seed(3);
  return torch::randint(0, config.vocab_size, {2, 9}, torch::kLong);
}

}  // namespace

TEST_CASE("checkpoint: save_pretrained then from_pretrained gives identical logits",
          "[checkpoint]") {
  for (const char* name :
       {"tiny-gpt2", "tiny-opt", "tiny-llama", "tiny-llama3", "tiny-mistral", "tiny-qwen2"}) {
    INFO(name);
    ferry::testing::TempDir dir;
    LayeredModel model = models::build(preset(name), 21);
    models::save_pretrained(model, dir.path());
    CHECK(std::filesystem::exists(dir.file("model.safetensors")));
    LayeredModel loaded = models::from_pretrained(dir.path());
    auto tokens = tokens_for(*model.config());
    CHECK(torch::equal(loaded.forward(tokens), model.forward(tokens)));
    CHECK(loaded.config()->to_hf_json() == model.config()->to_hf_json());
  }
}

TEST_CASE("checkpoint: tensors carry Hugging Face names and layouts", "[checkpoint]") {
  ferry::testing::TempDir gpt2_dir, llama_dir, opt_dir;
  models::save_pretrained(models::build(preset("tiny-gpt2"), 0), gpt2_dir.path());
  models::save_pretrained(models::build(preset("tiny-llama"), 0), llama_dir.path());
  models::save_pretrained(models::build(preset("tiny-opt"), 0), opt_dir.path());

  safetensors::Checkpoint gpt2(gpt2_dir.path());
  CHECK(gpt2.tensor("transformer.h.1.attn.c_attn.weight").shape ==
        std::vector<int64_t>{64, 192});  // Conv1D: [in, out]
  CHECK(gpt2.contains("transformer.wpe.weight"));
  CHECK(gpt2.contains("transformer.ln_f.bias"));
  CHECK_FALSE(gpt2.contains("lm_head.weight"));  // tied
  CHECK(read_json(gpt2_dir.file("config.json"))["architectures"][0] == "GPT2LMHeadModel");

  safetensors::Checkpoint llama(llama_dir.path());
  CHECK(llama.tensor("model.layers.0.self_attn.k_proj.weight").shape ==
        std::vector<int64_t>{32, 64});  // 2 kv heads of 16
  CHECK(llama.contains("model.norm.weight"));
  CHECK(llama.contains("lm_head.weight"));
  CHECK(llama.names().size() == 1 + 2 * 9 + 2);

  safetensors::Checkpoint opt(opt_dir.path());
  CHECK(opt.contains("model.decoder.embed_positions.weight"));
  CHECK(opt.contains("model.decoder.project_in.weight"));
  CHECK(opt.contains("model.decoder.project_out.weight"));
  CHECK(opt.contains("model.decoder.layers.1.fc2.bias"));

  ModelConfig llama_config = preset("tiny-llama");
  CHECK(models::hf_name(llama_config, Part::kBlock, 3, "mlp.up_proj.weight") ==
        "model.layers.3.mlp.up_proj.weight");
  CHECK(models::hf_name(llama_config, Part::kHead, 0, "lm_head.weight") == "lm_head.weight");
}

TEST_CASE("checkpoint: sharded checkpoints load like single files", "[checkpoint]") {
  ferry::testing::TempDir dir;
  LayeredModel model = models::build(preset("tiny-qwen2"), 4);
  models::save_pretrained(model, dir.path(), /*max_shard_bytes=*/100'000);
  CHECK(std::filesystem::exists(dir.file(safetensors::kIndexFileName)));
  CHECK_FALSE(std::filesystem::exists(dir.file(safetensors::kSingleFileName)));
  LayeredModel loaded = models::from_pretrained(dir.path());
  auto tokens = tokens_for(*model.config());
  CHECK(torch::equal(loaded.forward(tokens), model.forward(tokens)));
}

TEST_CASE("checkpoint: dtypes convert explicitly on load", "[checkpoint]") {
  ferry::testing::TempDir fp32_dir, bf16_dir;
  LayeredModel model = models::build(preset("tiny-llama"), 5);
  models::save_pretrained(model, fp32_dir.path());

  LayeredModel as_bf16 = models::from_pretrained(fp32_dir.path(), {DType::kBF16});
  CHECK(as_bf16.dtype() == torch::kBFloat16);
  auto original = model.parameters(), converted = as_bf16.parameters();
  for (size_t i = 0; i < original.size(); ++i) {
    CHECK(torch::equal(converted[i], original[i].to(torch::kBFloat16)));
  }

  LayeredModel as_fp16 = models::from_pretrained(fp32_dir.path(), {DType::kF16});
  CHECK(torch::equal(as_fp16.parameters()[3], original[3].to(torch::kHalf)));

  models::save_pretrained(as_bf16, bf16_dir.path());
  CHECK(safetensors::Checkpoint(bf16_dir.path()).tensor("model.embed_tokens.weight").dtype ==
        DType::kBF16);
  CHECK(read_json(bf16_dir.file("config.json"))["torch_dtype"] == "bfloat16");
  LayeredModel reloaded = models::from_pretrained(bf16_dir.path());
  CHECK(reloaded.dtype() == torch::kBFloat16);
  auto tokens = tokens_for(*model.config());
  CHECK(torch::equal(reloaded.forward(tokens), as_bf16.forward(tokens)));
}

TEST_CASE("checkpoint: a block streams straight into a caller's flat bundle", "[checkpoint]") {
  ferry::testing::TempDir dir;
  ModelConfig config = preset("tiny-llama");
  LayeredModel model = models::build(config, 6);
  models::save_pretrained(model, dir.path());

  models::PretrainedReader reader(dir.path());
  auto block = models::make_block(config, 0);
  torch::Tensor bundle = torch::zeros({config.block_parameter_count()});
  int64_t offset = 0;
  for (auto& parameter : block->parameters()) {
    parameter.set_data(bundle.narrow(0, offset, parameter.numel()).view(parameter.sizes()));
    offset += parameter.numel();
  }
  reader.read_part(Part::kBlock, 1, *block);

  std::vector<torch::Tensor> flat;
  for (const auto& parameter : model.blocks()[1]->parameters()) flat.push_back(parameter.flatten());
  CHECK(torch::equal(bundle, torch::cat(flat)));
  auto hidden = torch::randn({1, 4, config.hidden_size});
  auto context = model.make_context(torch::zeros({1, 4}, torch::kLong));
  CHECK(torch::equal(block->forward(hidden, context), model.blocks()[1]->forward(hidden, context)));
  CHECK(reader.source_of(Part::kBlock, 1, "mlp.down_proj.weight") ==
        "model.layers.1.mlp.down_proj.weight");
}

TEST_CASE("checkpoint: transformers' GPT-2 quirks load", "[checkpoint]") {
  // The hub's gpt2 has names without "transformer.", attn.bias mask buffers and, in some
  // exports, the tied lm_head.weight.
  ferry::testing::TempDir dir;
  LayeredModel model = models::build(preset("tiny-gpt2"), 7);
  models::save_pretrained(model, dir.path());
  NamedTensors tensors;
  for (auto& [name, tensor] : read_all(dir.path())) {
    tensors.emplace_back(name.substr(std::string("transformer.").size()), tensor);
  }
  tensors.emplace_back("h.0.attn.bias", torch::ones({1, 1, 128, 128}));
  tensors.emplace_back("h.0.attn.masked_bias", torch::tensor(-1e4));
  tensors.emplace_back("lm_head.weight", model.stem()->token_embedding().detach());
  write_all(dir.path(), tensors);
  LayeredModel loaded = models::from_pretrained(dir.path());
  auto tokens = tokens_for(*model.config());
  CHECK(torch::equal(loaded.forward(tokens), model.forward(tokens)));
}

TEST_CASE("checkpoint: bad directories name the file and the field", "[checkpoint]") {
  ferry::testing::TempDir dir;
  LayeredModel model = models::build(preset("tiny-llama"), 8);
  models::save_pretrained(model, dir.path());
  NamedTensors tensors = read_all(dir.path());
  const std::string config_path = dir.file("config.json");

  SECTION("a missing tensor") {
    NamedTensors fewer;
    for (auto& entry : tensors) {
      if (entry.first != "model.layers.1.mlp.up_proj.weight") fewer.push_back(entry);
    }
    write_all(dir.path(), fewer);
    CHECK_THROWS_WITH(models::from_pretrained(dir.path()),
                      Contains("lacks 1 tensors") &&
                          Contains("model.layers.1.mlp.up_proj.weight"));
  }
  SECTION("an unexpected tensor") {
    tensors.emplace_back("model.layers.2.mlp.up_proj.weight", torch::zeros({172, 64}));
    write_all(dir.path(), tensors);
    CHECK_THROWS_WITH(models::from_pretrained(dir.path()),
                      Contains("1 tensors that a llama model") &&
                          Contains("model.layers.2.mlp.up_proj.weight"));
  }
  SECTION("a shape that disagrees with config.json") {
    auto config = read_json(config_path);
    config["intermediate_size"] = 100;
    write_json(config_path, config);
    CHECK_THROWS_WITH(models::from_pretrained(dir.path()),
                      Contains("model.safetensors") && Contains("has shape [172, 64]") &&
                          Contains("needs [100, 64]"));
  }
  SECTION("heads that do not divide hidden_size") {
    auto config = read_json(config_path);
    config.erase("head_dim");
    config["num_attention_heads"] = 5;
    config["num_key_value_heads"] = 5;
    write_json(config_path, config);
    CHECK_THROWS_WITH(models::from_pretrained(dir.path()),
                      Contains(config_path) &&
                          Contains("hidden_size 64 is not divisible by num_attention_heads 5"));
  }
  SECTION("a missing config field") {
    auto config = read_json(config_path);
    config.erase("num_hidden_layers");
    write_json(config_path, config);
    CHECK_THROWS_WITH(models::from_pretrained(dir.path()),
                      Contains(config_path) && Contains("missing required field num_hidden_layers"));
  }
  SECTION("an integer parameter") {
    for (auto& entry : tensors) {
      if (entry.first == "model.norm.weight") entry.second = entry.second.to(torch::kInt32);
    }
    write_all(dir.path(), tensors);
    CHECK_THROWS_WITH(models::from_pretrained(dir.path()),
                      Contains("'model.norm.weight' has dtype I32"));
  }
  SECTION("no config.json") {
    std::filesystem::remove(config_path);
    CHECK_THROWS_WITH(models::from_pretrained(dir.path()), Contains("cannot read " + config_path));
  }
  SECTION("a model assembled by hand cannot be saved as a Hugging Face checkpoint") {
    struct Identity : Block {
      torch::Tensor forward(const torch::Tensor& hidden, const StepContext&) override {
        return hidden;
      }
    };
    LayeredModel custom(model.stem(), {std::make_shared<Identity>()}, model.head());
    CHECK_THROWS_WITH(models::save_pretrained(custom, dir.path()), Contains("assembled by hand"));
  }
}
