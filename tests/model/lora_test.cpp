// LoRA adapters on the built-in families (ModelConfig::lora): which linears they adapt, their
// initialisation, the forward against PEFT's (the fixture tools/fixtures/make_peft_fixture.py
// made), and PEFT's tensor names.

#include <fstream>
#include <set>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "ferry/model.h"
#include "ferry/safetensors.h"

// glog, which LibTorch includes, defines a CHECK macro of its own; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

#include "model/peft_fixture.h"

using namespace ferry;

namespace {

models::ModelConfig with_lora(const std::string& preset, std::vector<std::string> targets, std::int64_t rank = 4) {
  models::ModelConfig config = models::preset(preset);
  config.lora.rank = rank;
  config.lora.alpha = 8;
  config.lora.targets = std::move(targets);
  return config;
}

std::vector<std::string> modules(const models::ModelConfig& config) {
  std::vector<std::string> names;
  for (const models::LoraTarget& target : config.lora_targets()) names.push_back(target.module);
  return names;
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  REQUIRE(in.good());
  return nlohmann::json::parse(in);
}

}  // namespace

TEST_CASE("LoRA targets name the blocks' linears as PEFT's target_modules do") {
  using Names = std::vector<std::string>;
  CHECK(modules(with_lora("tiny-llama", {"all-linear"})) ==
        Names{"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"});
  CHECK(modules(with_lora("tiny-llama", {"q", "v_proj"})) == Names{"self_attn.q_proj", "self_attn.v_proj"});
  CHECK(modules(with_lora("tiny-opt", {"o", "up"})) == Names{"self_attn.out_proj", "fc1"});
  // GPT-2's two c_proj both match the last name, as in PEFT; a longer name picks one.
  CHECK(modules(with_lora("tiny-gpt2", {"c_proj"})) == Names{"attn.c_proj", "mlp.c_proj"});
  CHECK(modules(with_lora("tiny-gpt2", {"attn.c_proj"})) == Names{"attn.c_proj"});
  const models::ModelConfig gpt2 = with_lora("tiny-gpt2", {"c_attn"});
  CHECK(gpt2.lora_targets().front().fan_in_fan_out);
  CHECK(gpt2.lora_targets().front().out == 3 * gpt2.hidden_size);
  CHECK_THROWS_WITH(with_lora("tiny-gpt2", {"q"}).validate(), Catch::Contains("'q'") && Catch::Contains("attn.c_attn") &&
                                                                  Catch::Contains("such as c_attn"));
  CHECK_THROWS_WITH(with_lora("tiny-llama", {"c_attn"}).validate(), Catch::Contains("such as q_proj"));
  CHECK_THROWS_WITH(with_lora("tiny-llama", {"q"}, -1).validate(), Catch::Contains("lora rank = -1"));
  CHECK(with_lora("tiny-llama", {}, 0).lora_parameters().empty());
}

TEST_CASE("adapters start as PEFT's (A Kaiming-uniform, B zero) over a frozen base drawn as without them") {
  for (const char* preset : {"tiny-llama", "tiny-opt", "tiny-gpt2"}) {
    INFO(preset);
    const models::ModelConfig config = with_lora(preset, {"all-linear"});
    LayeredModel adapted = models::build(config, 5);
    models::ModelConfig plain_config = config;
    plain_config.lora = {};
    const LayeredModel plain = models::build(plain_config, 5);
    std::size_t adapters = 0;
    for (std::size_t i = 0; i < adapted.num_blocks(); ++i) {
      auto named = adapted.blocks()[i]->named_parameters();
      for (const auto& item : plain.blocks()[i]->named_parameters()) {
        CHECK(torch::equal(named[item.key()], item.value()));
        CHECK_FALSE(named[item.key()].requires_grad());
      }
      for (const models::ParameterSpec& spec : config.lora_parameters()) {
        const torch::Tensor& parameter = named[spec.name];
        CHECK(parameter.requires_grad());
        ++adapters;
        if (spec.name.find("lora_B") != std::string::npos) {
          CHECK(parameter.abs().max().item<double>() == 0);
        } else {
          const double bound = 1.0 / std::sqrt(static_cast<double>(spec.shape[1]));
          CHECK(parameter.abs().max().item<double>() <= bound);
          CHECK(parameter.abs().max().item<double>() > 0.9 * bound);
        }
      }
    }
    CHECK(adapters == adapted.num_blocks() * config.lora_parameters().size());
    for (const auto& parameter : adapted.stem()->parameters()) CHECK_FALSE(parameter.requires_grad());
    for (const auto& parameter : adapted.head()->parameters()) CHECK_FALSE(parameter.requires_grad());
    // B = 0: the adapted model computes the base model's logits.
    const torch::Tensor tokens = torch::randint(config.vocab_size, {2, 12}, torch::kLong);
    torch::NoGradGuard no_grad;
    CHECK(torch::equal(adapted.forward(tokens), plain.forward(tokens)));
  }
}

TEST_CASE("with PEFT's adapters loaded, the forward is PEFT's and the names are PEFT's") {
  if (!testing::have_peft_fixture()) {
    WARN("no PEFT fixture at " << testing::peft_fixture() << ": run tools/peft_fixtures.py");
    return;
  }
  const std::string fixture = testing::peft_fixture();
  safetensors::Reader reference(fixture + "/reference.safetensors");
  const torch::Tensor tokens = testing::read_tensor(reference, "input_ids");
  torch::NoGradGuard no_grad;
  const LayeredModel base = models::from_pretrained(fixture + "/base");
  CHECK(torch::allclose(base.forward(tokens), testing::read_tensor(reference, "base_logits"), 1e-5, 1e-5));
  const LayeredModel model = testing::load_peft_model("all-linear");
  const torch::Tensor logits = model.forward(tokens);
  const torch::Tensor expected = testing::read_tensor(reference, "adapter_logits");
  INFO("largest difference " << (logits - expected).abs().max().item<double>());
  CHECK(torch::allclose(logits, expected, 1e-5, 1e-5));
  CHECK_FALSE(torch::allclose(logits, testing::read_tensor(reference, "base_logits"), 1e-3, 1e-3));

  // Every name ferry gives an adapter is one PEFT saved, and the other way round.
  for (const char* adapter : {"all-linear", "q-v"}) {
    INFO(adapter);
    nlohmann::json config = read_json(fixture + "/" + adapter + "/adapter_config.json");
    models::ModelConfig adapted = *model.config();
    const std::set<std::string> targets = testing::peft_targets(config);
    adapted.lora.targets.assign(targets.begin(), targets.end());
    std::set<std::string> names, expected_names;
    for (std::int64_t i = 0; i < adapted.num_layers; ++i) {
      for (const models::ParameterSpec& spec : adapted.lora_parameters()) names.insert(models::peft_name(adapted, i, spec.name));
    }
    const safetensors::Reader saved(fixture + "/" + adapter + "/adapter_model.safetensors");
    for (const safetensors::TensorInfo& info : saved.header().tensors) expected_names.insert(info.name);
    CHECK(names == expected_names);
  }
  // PEFT's fresh A has the range of ferry's Kaiming-uniform: within 1/sqrt(in), near its edge.
  const torch::Tensor fresh = testing::read_tensor(reference, "fresh_lora_A");
  const double bound = 1.0 / std::sqrt(static_cast<double>(fresh.size(1)));
  CHECK(fresh.abs().max().item<double>() <= bound);
  CHECK(fresh.abs().max().item<double>() > 0.9 * bound);
}
