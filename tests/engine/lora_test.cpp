// LoRA over a frozen base against an independent reference: a tiny LLaMA with its adapters
// written out by hand here in plain LibTorch, trained by torch::optim::AdamW on the adapters
// alone. The engine runs it with the base resident, streamed from host memory and from NVMe.

#include <cmath>
#include <fstream>
#include <map>
#include <set>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "ferry/engine.h"
#include "ferry/model.h"
#include "ferry/safetensors.h"
#include "support/temp_dir.h"

// glog, which LibTorch includes, defines a CHECK macro of its own; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

#include "engine/training.h"
#include "model/peft_fixture.h"

using namespace ferry;
using namespace ferry::testing;

namespace {

constexpr int kSteps = 20;
constexpr Tier G = Tier::kGpu, H = Tier::kHost, N = Tier::kNvme;

std::uint64_t stored(std::uint64_t bytes) { return (bytes + kIoAlignment - 1) / kIoAlignment * kIoAlignment; }

models::ModelConfig lora_llama() {
  models::ModelConfig config = models::preset("tiny-llama");
  config.lora.rank = 4;
  config.lora.alpha = 8;
  config.lora.targets = {"all-linear"};
  return config;
}

using Named = std::map<std::string, torch::Tensor>;

// Every parameter of the model under its Hugging Face name, cloned to fp32.
Named named_parameters(const LayeredModel& model) {
  const models::ModelConfig& config = *model.config();
  Named named;
  auto add = [&](models::Part part, std::int64_t block, const torch::nn::Module& module) {
    for (const auto& item : module.named_parameters()) {
      named[models::hf_name(config, part, block, item.key())] = item.value().detach().to(torch::kFloat).clone();
    }
  };
  add(models::Part::kStem, 0, *model.stem());
  for (std::size_t i = 0; i < model.num_blocks(); ++i) add(models::Part::kBlock, static_cast<std::int64_t>(i), *model.blocks()[i]);
  add(models::Part::kHead, 0, *model.head());
  return named;
}

// PEFT's LoraLayer: a frozen linear and its adapters A and B, which torch's AdamW trains.
struct Adapted : torch::nn::Module {
  Adapted(torch::Tensor base_weight, const torch::Tensor& a, const torch::Tensor& b, double scale)
      : weight(std::move(base_weight)), scale(scale) {
    lora_a = register_module("lora_A", torch::nn::Linear(torch::nn::LinearOptions(a.size(1), a.size(0)).bias(false)));
    lora_b = register_module("lora_B", torch::nn::Linear(torch::nn::LinearOptions(b.size(1), b.size(0)).bias(false)));
    torch::NoGradGuard no_grad;
    lora_a->weight.copy_(a);
    lora_b->weight.copy_(b);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::nn::functional::linear(x, weight) + lora_b(lora_a(x)) * scale;
  }
  torch::Tensor weight;
  double scale;
  torch::nn::Linear lora_a{nullptr}, lora_b{nullptr};
};

// transformers' LlamaForCausalLM, written out: RMSNorm, rotary attention with grouped KV heads,
// SwiGLU, and the shifted cross-entropy.
struct ReferenceLlama {
  ReferenceLlama(const models::ModelConfig& config, const Named& initial) : config(config), weights(initial) {
    for (std::int64_t i = 0; i < config.num_layers; ++i) {
      for (const models::LoraTarget& target : config.lora_targets()) {
        const std::string prefix = "model.layers." + std::to_string(i) + "." + target.module;
        auto adapted = std::make_shared<Adapted>(initial.at(prefix + ".weight"), initial.at(prefix + ".lora_A.weight"),
                                                 initial.at(prefix + ".lora_B.weight"), config.lora.scale());
        linears[prefix] = adapted;
        for (const auto& parameter : adapted->parameters()) adapters.push_back(parameter);
      }
    }
  }

  torch::Tensor rms_norm(const torch::Tensor& x, const std::string& name) const {
    return weights.at(name) * (x * torch::rsqrt(x.pow(2).mean(-1, true) + config.norm_eps));
  }

  torch::Tensor loss(const data::Batch& batch) {
    const torch::Tensor tokens = batch.input_ids;
    const std::int64_t b = tokens.size(0), s = tokens.size(1), d = config.head_dim;
    const std::int64_t heads = config.num_heads, kv_heads = config.num_kv_heads;
    torch::Tensor inv_freq = 1.0 / torch::pow(config.rope_theta, torch::arange(0, d, 2, torch::kFloat) / d);
    torch::Tensor angles = torch::outer(torch::arange(s, torch::kFloat), inv_freq);
    torch::Tensor cos = torch::cat({angles, angles}, -1).cos(), sin = torch::cat({angles, angles}, -1).sin();
    auto rotate = [&](const torch::Tensor& x) {
      torch::Tensor half = torch::cat({-x.narrow(-1, d / 2, d / 2), x.narrow(-1, 0, d / 2)}, -1);
      return x * cos + half * sin;
    };
    torch::Tensor causal = torch::ones({s, s}, torch::kBool).triu(1);
    torch::Tensor x = torch::embedding(weights.at("model.embed_tokens.weight"), tokens);
    for (std::int64_t i = 0; i < config.num_layers; ++i) {
      const std::string layer = "model.layers." + std::to_string(i) + ".";
      auto linear = [&](const std::string& name, const torch::Tensor& input) { return linears.at(layer + name)->forward(input); };
      torch::Tensor h = rms_norm(x, layer + "input_layernorm.weight");
      torch::Tensor q = rotate(linear("self_attn.q_proj", h).view({b, s, heads, d}).transpose(1, 2));
      torch::Tensor k = rotate(linear("self_attn.k_proj", h).view({b, s, kv_heads, d}).transpose(1, 2));
      torch::Tensor v = linear("self_attn.v_proj", h).view({b, s, kv_heads, d}).transpose(1, 2);
      k = k.repeat_interleave(heads / kv_heads, 1);
      v = v.repeat_interleave(heads / kv_heads, 1);
      torch::Tensor scores = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(d));
      torch::Tensor attended = torch::matmul(scores.masked_fill(causal, -INFINITY).softmax(-1), v);
      x = x + linear("self_attn.o_proj", attended.transpose(1, 2).reshape({b, s, heads * d}));
      h = rms_norm(x, layer + "post_attention_layernorm.weight");
      x = x + linear("mlp.down_proj", torch::silu(linear("mlp.gate_proj", h)) * linear("mlp.up_proj", h));
    }
    torch::Tensor logits = torch::nn::functional::linear(rms_norm(x, "model.norm.weight"), weights.at("lm_head.weight"));
    return torch::nn::functional::cross_entropy(
        logits.narrow(1, 0, s - 1).reshape({-1, config.vocab_size}), batch.labels.narrow(1, 1, s - 1).reshape({-1}),
        torch::nn::functional::CrossEntropyFuncOptions().ignore_index(kIgnoreIndex));
  }

  // The adapters under PEFT's names.
  Named adapter_weights() const {
    Named named;
    for (const auto& [prefix, adapted] : linears) {
      named["base_model.model." + prefix + ".lora_A.weight"] = adapted->lora_a->weight.detach().clone();
      named["base_model.model." + prefix + ".lora_B.weight"] = adapted->lora_b->weight.detach().clone();
    }
    return named;
  }

  models::ModelConfig config;
  Named weights;
  std::map<std::string, std::shared_ptr<Adapted>> linears;
  std::vector<torch::Tensor> adapters;
};

Named read_safetensors(const std::string& path) {
  safetensors::Reader reader(path);
  Named named;
  for (const safetensors::TensorInfo& info : reader.header().tensors) {
    REQUIRE(info.dtype == DType::kF32);
    torch::Tensor values = torch::empty(info.shape, torch::kFloat);
    reader.read_into(info.name, values.data_ptr(), info.bytes());
    named[info.name] = values;
  }
  return named;
}

Named read_checkpoint_weights(const std::string& dir) {
  safetensors::Checkpoint checkpoint(dir);
  Named named;
  for (const std::string& name : checkpoint.names()) {
    const safetensors::TensorInfo& info = checkpoint.tensor(name);
    torch::Tensor values = torch::empty(info.shape, torch::kFloat);
    checkpoint.read_into(name, values.data_ptr(), info.bytes());
    named[name] = values;
  }
  return named;
}

double relative_difference(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>() / std::max(b.abs().max().item<double>(), 1e-30);
}

struct Run {
  std::vector<double> losses;
  Named adapters;  // PEFT's names
  Named merged;    // the merged export, HF names
  StoreStats store;
};

Run train_lora(const EngineConfig& config, const TempDir& dir) {
  Engine engine(models::build(lora_llama(), 7), config);
  auto loader = demo_loader(3);
  Run run;
  for (int i = 0; i < kSteps; ++i) run.losses.push_back(engine.train_step(loader->next())->loss);
  run.store = engine.stats().store;
  const std::string name = std::string(to_string(config.mode)) + "-" + std::to_string(config.placement.parts.size());
  engine.export_adapter(dir.file(name + "-adapter"), "tiny-llama");
  engine.export_pretrained(dir.file(name + "-merged"), Precision::kF32);
  run.adapters = read_safetensors(dir.file(name + "-adapter") + "/adapter_model.safetensors");
  run.merged = read_checkpoint_weights(dir.file(name + "-merged"));
  return run;
}

}  // namespace

TEST_CASE("LoRA trains the adapters alone as a hand-written LoRA under torch's AdamW, with the base resident or streamed") {
  TempDir dir;
  const models::ModelConfig model = lora_llama();
  const Named initial = named_parameters(models::build(model, 7));

  // The reference: the same start, torch::optim::AdamW over the adapters only.
  ReferenceLlama reference(model, initial);
  EngineConfig gpu = base_config(Mode::kGpu);
  torch::optim::AdamW optimizer(reference.adapters, torch::optim::AdamWOptions(gpu.optimizer.lr)
                                                        .betas({gpu.optimizer.beta1, gpu.optimizer.beta2})
                                                        .eps(gpu.optimizer.eps)
                                                        .weight_decay(gpu.optimizer.weight_decay));
  std::vector<double> expected_losses;
  auto loader = demo_loader(3);
  for (int i = 0; i < kSteps; ++i) {
    optimizer.zero_grad();
    torch::Tensor loss = reference.loss(loader->next());
    loss.backward();
    optimizer.step();
    expected_losses.push_back(loss.item<double>());
  }
  const Named expected_adapters = reference.adapter_weights();

  const Run resident = train_lora(gpu, dir);
  INFO("gpu mode");
  REQUIRE(resident.losses.size() == expected_losses.size());
  for (std::size_t i = 0; i < expected_losses.size(); ++i) {
    INFO("step " << i + 1);
    CHECK(std::abs(resident.losses[i] - expected_losses[i]) <= 1e-5 * expected_losses[i]);
  }
  CHECK(resident.losses.back() < resident.losses.front() - 0.1);
  REQUIRE(resident.adapters.size() == expected_adapters.size());
  for (const auto& [name, values] : expected_adapters) {
    INFO(name);
    REQUIRE(resident.adapters.count(name) == 1);
    CHECK(relative_difference(resident.adapters.at(name), values) <= 1e-4);
  }
  // The merged export is the base, untouched, plus scale * B A where adapters are.
  REQUIRE(resident.merged.size() == initial.size() - expected_adapters.size());
  for (const auto& [name, values] : resident.merged) {
    INFO(name);
    const std::string module = name.substr(0, name.rfind('.'));
    const std::string a = "base_model.model." + module + ".lora_A.weight";
    if (resident.adapters.count(a) == 0) {
      CHECK(torch::equal(values, initial.at(name)));
      continue;
    }
    const torch::Tensor b = resident.adapters.at("base_model.model." + module + ".lora_B.weight");
    const torch::Tensor delta = torch::matmul(b, resident.adapters.at(a)) * model.lora.scale();
    CHECK(delta.abs().max().item<double>() > 0);
    CHECK(torch::equal(values, initial.at(name) + delta));
  }

  // The same run with the base streamed from host memory and from NVMe: equal bit for bit.
  EngineConfig streamed = base_config(Mode::kAuto);
  streamed.nvme_directories = {dir.subdir("nvme")};
  const std::size_t parts = static_cast<std::size_t>(model.num_layers) + 2;
  SECTION("zero-offload: the base resident, the adapters updated by the CPU") { streamed.mode = Mode::kZeroOffload; }
  SECTION("the base streamed from host memory, the adapters updated by the CPU") {
    streamed.placement.parts.assign(parts, everything_on(H, H));
    streamed.placement.parts.front() = streamed.placement.parts.back() = everything_on(G, H);
  }
  SECTION("fuyou: the base streamed from NVMe, the adapters' states on NVMe") { streamed.mode = Mode::kFuyou; }
  SECTION("the base streamed from NVMe, the adapters' states in host memory") {
    streamed.placement.parts.assign(parts, everything_on(G, G));
    for (std::size_t p = 1; p + 1 < parts; ++p) streamed.placement.parts[p] = everything_on(N, H);
  }
  const Run run = train_lora(streamed, dir);
  CHECK(run.losses == resident.losses);
  for (const auto& [name, values] : resident.adapters) {
    INFO(name);
    CHECK(torch::equal(run.adapters.at(name), values));
  }
  for (const auto& [name, values] : resident.merged) {
    INFO(name);
    CHECK(torch::equal(run.merged.at(name), values));
  }
  // Frozen parameters never go home: what leaves the device is the adapters' gradients alone.
  const std::uint64_t block_gradients = stored(static_cast<std::uint64_t>(model.lora_parameter_count()) * 4);
  const auto& down = run.store.transfers[static_cast<int>(G)][static_cast<int>(H)];
  CHECK(down.bytes <= kSteps * model.num_layers * block_gradients);
}

TEST_CASE("the base stays bit for bit what it was, and only the adapters have gradients and optimizer states") {
  const models::ModelConfig model = lora_llama();
  LayeredModel built = models::build(model, 7);
  const Named initial = named_parameters(built);
  LayeredModel handle = built;  // shares the modules, which the engine rebinds to its bundles
  Engine engine(std::move(built), base_config(Mode::kGpu));
  auto loader = demo_loader(3);
  for (int i = 0; i < 3; ++i) engine.train_step(loader->next());
  std::int64_t changed = 0;
  for (const auto& [name, values] : named_parameters(handle)) {
    INFO(name);
    if (name.find(".lora_") != std::string::npos) {
      changed += !torch::equal(values, initial.at(name));
    } else {
      CHECK(torch::equal(values, initial.at(name)));
    }
  }
  CHECK(changed == 2 * 7 * model.num_layers);

  // The sizing: the base as parameters alone, the adapters with every role.
  const TierDemand demand = engine_demand(part_shapes(model), base_config(Mode::kGpu));
  std::map<std::string, std::uint64_t> roles;
  for (const TierDemand::Item& item : demand.items[static_cast<int>(G)]) roles[item.role] = item.bytes;
  auto bytes = [](std::int64_t numel) { return stored(static_cast<std::uint64_t>(numel) * 4); };
  const std::uint64_t adapters = model.num_layers * bytes(model.lora_parameter_count());
  CHECK(roles.at("frozen parameters") == bytes(model.stem_parameter_count()) +
                                             model.num_layers * bytes(model.block_parameter_count()) +
                                             bytes(model.head_parameter_count()));
  CHECK(roles.at("parameters") == adapters);
  CHECK(roles.at("gradients") == adapters);
  CHECK(roles.at("optimizer states") == 2 * adapters);
}

TEST_CASE("a resumed LoRA run gives the losses of an uninterrupted one, from a checkpoint of the adapters alone") {
  TempDir dir;
  // zo2's checkpoint holds the adapters and their AdamW moments as a first-order one does.
  const Mode mode = GENERATE(Mode::kZeroOffload, Mode::kZo2);
  INFO(to_string(mode));
  EngineConfig config = base_config(mode);
  const std::string checkpoint = dir.file("checkpoint");
  Engine uninterrupted(models::build(lora_llama(), 7), config);
  const std::vector<double> losses = losses_saving_at(uninterrupted, 6, 3, checkpoint);
  for (const std::string& name : safetensors::Checkpoint(checkpoint).names()) {
    INFO(name);
    CHECK(name.find(".lora_") != std::string::npos);
  }
  // A resumed run starts over the same base (the seed draws it) and other adapters.
  Engine resumed(models::build(lora_llama(), 7), config);
  require_resumed_losses(resumed, checkpoint, 3, losses);

  models::ModelConfig other = lora_llama();
  other.lora.alpha = 16;
  Engine mismatched(models::build(other, 7), config);
  CHECK_THROWS_WITH(mismatched.load(checkpoint), Catch::Contains("frozen parameters") && Catch::Contains("\"alpha\":8"));
}

TEST_CASE("LoRA settings the engine cannot run are refused, naming them") {
  models::ModelConfig model = lora_llama();
  model.lora.targets = {"q_proj", "qkv"};
  CHECK_THROWS_WITH(models::build(model, 7), Catch::Contains("'qkv'") && Catch::Contains("self_attn.q_proj"));
  model.lora.targets = {"q"};
  model.lora.dropout = 1.5;
  CHECK_THROWS_WITH(models::build(model, 7), Catch::Contains("lora dropout = 1.5"));
  model.lora.dropout = 0;
  // zo2 trains the adapters, but its compressed transfers are of a block's trained weights alone.
  EngineConfig zo2 = base_config(Mode::kZo2);
  zo2.zo.transfer = ZoTransfer::kFp8;
  CHECK_THROWS_WITH(Engine(models::build(model, 7), zo2),
                    Catch::Contains("zo transfer fp8") && Catch::Contains("frozen parameters") &&
                        Catch::Contains("base storage fp8"));
}

TEST_CASE("the exports are PEFT's: adapter names and adapter_config.json keys, and the merged model") {
  if (!have_peft_fixture()) {
    WARN("no PEFT fixture at " << peft_fixture() << ": run tools/peft_fixtures.py");
    return;
  }
  TempDir dir;
  for (const char* adapter : {"all-linear", "q-v"}) {
    INFO(adapter);
    const std::string expected_dir = peft_fixture() + "/" + adapter;
    nlohmann::json expected;
    std::ifstream(expected_dir + "/adapter_config.json") >> expected;
    Engine engine(load_peft_model(adapter), base_config(Mode::kGpu));
    const std::string out = dir.file(adapter);
    engine.export_adapter(out, "base");

    nlohmann::json written;
    std::ifstream(out + "/adapter_config.json") >> written;
    for (const auto& item : written.items()) {
      INFO(item.key());
      CHECK(expected.contains(item.key()));
    }
    for (const char* key : {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "fan_in_fan_out"}) {
      INFO(key);
      CHECK(written.at(key) == expected.at(key));
    }
    CHECK(peft_targets(written) == peft_targets(expected));

    // The same tensors, names, shapes and values, as PEFT's.
    safetensors::Reader ours(out + "/adapter_model.safetensors"), theirs(expected_dir + "/adapter_model.safetensors");
    REQUIRE(ours.header().tensors.size() == theirs.header().tensors.size());
    for (const auto& info : theirs.header().tensors) {
      INFO(info.name);
      CHECK(torch::equal(read_tensor(ours, info.name), read_tensor(theirs, info.name)));
    }
    if (std::string(adapter) != "all-linear") continue;
    // The merged export against PEFT's merge_and_unload.
    engine.export_pretrained(dir.file("merged"), Precision::kF32);
    safetensors::Checkpoint merged(dir.file("merged")), peft_merged(peft_fixture() + "/merged");
    CHECK(merged.names() == peft_merged.names());
    for (const std::string& name : peft_merged.names()) {
      INFO(name);
      const safetensors::TensorInfo& info = peft_merged.tensor(name);
      torch::Tensor a = torch::empty(info.shape, torch::kFloat), b = torch::empty(info.shape, torch::kFloat);
      merged.read_into(name, a.data_ptr(), info.bytes());
      peft_merged.read_into(name, b.data_ptr(), info.bytes());
      CHECK(torch::allclose(a, b, 1e-6, 1e-6));
    }
  }
}
