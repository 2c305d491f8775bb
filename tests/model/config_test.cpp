#include <catch2/catch.hpp>

#include <string>

#include "ferry/check.h"
#include "ferry/model_config.h"

using namespace ferry::models;
using Catch::Matchers::Contains;

TEST_CASE("config: presets have the public architectures' parameter counts", "[config]") {
  // Counts as reported by transformers' model.num_parameters() for the public checkpoints.
  CHECK(preset("gpt2").parameter_count() == 124439808);
  CHECK(preset("gpt2-xl").parameter_count() == 1557611200);
  CHECK(preset("opt-125m").parameter_count() == 125239296);
  CHECK(preset("opt-350m").parameter_count() == 331196416);
  CHECK(preset("llama-7b").parameter_count() == 6738415616);
  CHECK(preset("llama3-8b").parameter_count() == 8030261248);
  CHECK(preset("mistral-7b").parameter_count() == 7241732096);
  CHECK(preset("qwen2-0.5b").parameter_count() == 494032768);
  CHECK(preset("qwen2-7b").parameter_count() == 7615616512);
  // Planning a 175B model allocates nothing.
  CHECK(preset("opt-175b").parameter_count() > 174'000'000'000);
  // GPT-3 as Megatron-LM counts it: 12 h^2 + 13 h per block, tied embeddings, 2048 positions.
  CHECK(preset("gpt3-175b").parameter_count() == 174'604'259'328);
  CHECK(preset("gpt3-13b").parameter_count() == 12'853'386'240);
  CHECK(preset("llama-1.3b").hidden_size == 2048);
  CHECK(preset("llama-2.7b").num_heads == 20);
}

TEST_CASE("config: every preset validates and tiny presets are tiny", "[config]") {
  for (const std::string& name : preset_names()) {
    INFO(name);
    ModelConfig config = preset(name);
    CHECK_NOTHROW(config.validate());
    CHECK(config.parameter_count() ==
          config.stem_parameter_count() + config.num_layers * config.block_parameter_count() +
              config.head_parameter_count());
    if (name.rfind("tiny-", 0) == 0) {
      CHECK(config.parameter_count() < 1'000'000);
    }
  }
  CHECK_THROWS_WITH(preset("llama-9b"),
                    Contains("unknown model preset 'llama-9b'") && Contains("llama3-70b"));
}

TEST_CASE("config: block bytes follow the dtype", "[config]") {
  ModelConfig config = preset("llama-7b");
  config.dtype = ferry::DType::kBF16;
  CHECK(config.block_bytes() == 2u * 202383360u);
  CHECK(config.block_parameters().front().name == "input_layernorm.weight");
}

TEST_CASE("config: Hugging Face config.json of each family", "[config]") {
  SECTION("gpt2 with transformers' defaults for absent fields") {
    auto config = ModelConfig::from_hf_json(
        R"({"model_type":"gpt2","vocab_size":1000,"n_embd":64,"n_layer":2,"n_head":4,
            "n_inner":null,"torch_dtype":"bfloat16"})",
        "gpt2/config.json");
    CHECK(config.family == Family::kGpt2);
    CHECK(config.intermediate_size == 256);
    CHECK(config.max_position_embeddings == 1024);
    CHECK(config.tie_word_embeddings);
    CHECK(config.activation == Activation::kGeluTanh);
    CHECK(config.dtype == ferry::DType::kBF16);
  }
  SECTION("opt with a projection and post-norm") {
    auto config = ModelConfig::from_hf_json(
        R"({"model_type":"opt","vocab_size":1000,"hidden_size":64,"num_hidden_layers":2,
            "num_attention_heads":4,"ffn_dim":128,"word_embed_proj_dim":32,
            "do_layer_norm_before":false})",
        "opt/config.json");
    CHECK(config.embed_dim() == 32);
    CHECK_FALSE(config.do_layer_norm_before);
    CHECK(config.pad_token_id == 1);
    CHECK(config.stem_parameters().back().name == "project_in.weight");
  }
  SECTION("llama 3.1 with rope scaling (transformers 4.x keys)") {
    auto config = ModelConfig::from_hf_json(
        R"({"model_type":"llama","vocab_size":1000,"hidden_size":64,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"intermediate_size":128,
            "rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192}})",
        "llama/config.json");
    CHECK(config.num_kv_heads == 2);
    CHECK(config.head_dim == 16);
    CHECK(config.rope_theta == 500000.0);
    CHECK(config.rope_scaling.type == "llama3");
    CHECK(config.rope_scaling.factor == 8.0);
    CHECK_FALSE(config.tie_word_embeddings);
  }
  SECTION("rope_parameters (transformers 5 keys)") {
    auto config = ModelConfig::from_hf_json(
        R"({"model_type":"qwen2","vocab_size":1000,"hidden_size":64,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"intermediate_size":128,
            "rope_parameters":{"rope_type":"default","rope_theta":1000000.0}})",
        "qwen2/config.json");
    CHECK(config.rope_theta == 1000000.0);
    CHECK(config.qkv_bias);
    CHECK_FALSE(config.attention_out_bias);
  }
  SECTION("mistral's sliding window") {
    auto config = ModelConfig::from_hf_json(
        R"({"model_type":"mistral","vocab_size":1000,"hidden_size":64,"num_hidden_layers":2,
            "num_attention_heads":4,"intermediate_size":128,"sliding_window":null})",
        "mistral/config.json");
    CHECK(config.sliding_window == 0);
  }
}

TEST_CASE("config: to_hf_json round-trips through from_hf_json", "[config]") {
  for (const char* name : {"tiny-gpt2", "tiny-opt", "tiny-llama3", "tiny-mistral", "tiny-qwen2",
                           "opt-350m"}) {
    INFO(name);
    ModelConfig original = preset(name);
    ModelConfig parsed = ModelConfig::from_hf_json(original.to_hf_json(), "config.json");
    CHECK(parsed.model_type == original.model_type);
    CHECK(parsed.parameter_count() == original.parameter_count());
    CHECK(parsed.head_dim == original.head_dim);
    CHECK(parsed.num_kv_heads == original.num_kv_heads);
    CHECK(parsed.rope_theta == original.rope_theta);
    CHECK(parsed.rope_scaling.type == original.rope_scaling.type);
    CHECK(parsed.sliding_window == original.sliding_window);
    CHECK(parsed.tie_word_embeddings == original.tie_word_embeddings);
    CHECK(parsed.do_layer_norm_before == original.do_layer_norm_before);
    CHECK(parsed.norm_eps == original.norm_eps);
  }
}

TEST_CASE("config: inconsistent or missing fields name the file and the field", "[config]") {
  const std::string file = "bad/config.json";
  CHECK_THROWS_WITH(
      ModelConfig::from_hf_json(R"({"model_type":"gpt2","vocab_size":10,"n_embd":100,
                                   "n_layer":1,"n_head":3})",
                                file),
      Contains(file) && Contains("hidden_size 100 is not divisible by num_attention_heads 3"));
  CHECK_THROWS_WITH(
      ModelConfig::from_hf_json(R"({"model_type":"llama","vocab_size":10,"hidden_size":64,
                                   "num_hidden_layers":1,"num_attention_heads":4,
                                   "num_key_value_heads":3,"intermediate_size":8})",
                                file),
      Contains(file) && Contains("num_attention_heads 4 is not divisible by num_key_value_heads 3"));
  CHECK_THROWS_WITH(
      ModelConfig::from_hf_json(R"({"model_type":"llama","vocab_size":10,"num_hidden_layers":1,
                                   "num_attention_heads":4,"intermediate_size":8})",
                                file),
      Contains(file) && Contains("missing required field hidden_size"));
  CHECK_THROWS_WITH(ModelConfig::from_hf_json(R"({"model_type":"bert"})", file),
                    Contains("model_type 'bert' is not supported") && Contains("qwen2"));
  CHECK_THROWS_WITH(ModelConfig::from_hf_json(R"({"vocab_size":3})", file),
                    Contains("missing required field model_type"));
  CHECK_THROWS_WITH(
      ModelConfig::from_hf_json(R"({"model_type":"opt","vocab_size":"many","hidden_size":64,
                                   "num_hidden_layers":1,"num_attention_heads":4,"ffn_dim":8})",
                                file),
      Contains("field vocab_size must be an integer"));
  CHECK_THROWS_WITH(
      ModelConfig::from_hf_json(R"({"model_type":"llama","vocab_size":10,"hidden_size":64,
                                   "num_hidden_layers":1,"num_attention_heads":4,
                                   "intermediate_size":8,"rope_scaling":{"rope_type":"yarn"}})",
                                file),
      Contains("rope type 'yarn' is not supported"));
  CHECK_THROWS_WITH(
      ModelConfig::from_hf_json(R"({"model_type":"gpt2","vocab_size":10,"n_embd":64,"n_layer":1,
                                   "n_head":4,"activation_function":"gelu_fast"})",
                                file),
      Contains("activation_function is 'gelu_fast'"));
  CHECK_THROWS_WITH(ModelConfig::from_hf_json("[1, 2]", file), Contains("not a JSON object"));
}
