// An fp8 e4m3 LoRA base (EngineConfig::base_storage): the blocks' frozen weights stored in fp8
// with a scale per output channel and decoded on the device at each visit. The reference is the
// same model with those weights replaced by their dequantized values, written out here channel by
// channel from the scalar codec, and run with the base in the compute dtype.

#include <cmath>
#include <fstream>
#include <iterator>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "ferry/engine.h"
#include "ferry/model.h"
#include "ferry/safetensors.h"
#include "ferry/zo.h"
#include "support/temp_dir.h"

// glog, which LibTorch includes, defines a CHECK macro of its own; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

#include "engine/training.h"

using namespace ferry;
using namespace ferry::testing;

namespace {

constexpr Tier G = Tier::kGpu, H = Tier::kHost, N = Tier::kNvme;

std::uint64_t stored(std::uint64_t bytes) { return (bytes + kIoAlignment - 1) / kIoAlignment * kIoAlignment; }

models::ModelConfig lora_llama() {
  models::ModelConfig config = models::preset("tiny-llama");
  config.lora.rank = 4;
  config.lora.alpha = 8;
  config.lora.targets = {"all-linear"};
  return config;
}

// One output channel (a matrix's row, a vector's element) through fp8 with scale amax / 448.
torch::Tensor dequantized(const torch::Tensor& weight) {
  torch::Tensor values = weight.detach().to(torch::kFloat).contiguous().clone();
  const std::int64_t channels = values.dim() >= 2 ? values.size(0) : values.numel();
  torch::Tensor rows = values.view({channels, -1});
  for (std::int64_t c = 0; c < channels; ++c) {
    float* row = rows[c].data_ptr<float>();
    float amax = 0;
    for (std::int64_t i = 0; i < rows.size(1); ++i) amax = std::max(amax, std::fabs(row[i]));
    const float scale = amax > 0 ? amax / optim::kFp8E4M3Max : 1.0f;
    for (std::int64_t i = 0; i < rows.size(1); ++i) {
      row[i] = optim::fp8_e4m3_decode(optim::fp8_e4m3_encode(row[i] / scale)) * scale;
    }
  }
  return values;
}

// The model with every block's frozen weight replaced by its dequantized values.
LayeredModel dequantized_model(const models::ModelConfig& config) {
  LayeredModel model = models::build(config, 7);
  torch::NoGradGuard no_grad;
  for (std::size_t i = 0; i < model.num_blocks(); ++i) {
    for (auto& item : model.blocks()[i]->named_parameters()) {
      if (!item.value().requires_grad()) item.value().copy_(dequantized(item.value()));
    }
  }
  return model;
}

std::string contents(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

EngineConfig fp8_base(EngineConfig config) {
  config.base_storage = BaseStorage::kFp8;
  return config;
}

}  // namespace

TEST_CASE("an fp8 base computes what its dequantized weights compute, resident or streamed, and trains the adapters alone") {
  TempDir dir;
  const models::ModelConfig model = lora_llama();
  const torch::Tensor tokens = demo_loader(5)->next().input_ids;

  Engine reference(dequantized_model(model), base_config(Mode::kGpu));
  const torch::Tensor expected_logits = reference.logits(tokens);
  std::vector<double> expected_losses;
  auto reference_loader = demo_loader(3);
  for (int i = 0; i < 6; ++i) expected_losses.push_back(reference.train_step(reference_loader->next())->loss);
  CHECK(expected_losses.back() < expected_losses.front());
  reference.export_adapter(dir.file("reference-adapter"), "tiny-llama");
  reference.export_pretrained(dir.file("reference-merged"), Precision::kF32);

  EngineConfig config = fp8_base(base_config(Mode::kAuto));
  config.nvme_directories = {dir.subdir("nvme")};
  const std::size_t parts = static_cast<std::size_t>(model.num_layers) + 2;
  SECTION("gpu: the base resident, decoded at each visit") { config.mode = Mode::kGpu; }
  SECTION("the base in host memory, streamed") {
    config.placement.parts.assign(parts, everything_on(H, H));
    config.placement.parts.front() = config.placement.parts.back() = everything_on(G, H);
  }
  SECTION("fuyou: the base on NVMe") { config.mode = Mode::kFuyou; }
  Engine engine(models::build(model, 7), config);
  CHECK(torch::equal(engine.logits(tokens), expected_logits));
  std::vector<double> losses;
  auto loader = demo_loader(3);
  for (int i = 0; i < 6; ++i) losses.push_back(engine.train_step(loader->next())->loss);
  CHECK(losses == expected_losses);

  // The adapters trained as the reference's did; the base, read back, is the dequantized one untouched.
  engine.export_adapter(dir.file("adapter"), "tiny-llama");
  engine.export_pretrained(dir.file("merged"), Precision::kF32);
  for (const std::string file : {"adapter/adapter_model.safetensors", "merged/model.safetensors"}) {
    INFO(file);
    CHECK(contents(dir.file(file)) == contents(dir.file("reference-" + file)));
  }
}

TEST_CASE("an fp8 base is sized as one byte an element plus a scale per channel, and a checkpoint records it") {
  TempDir dir;
  const models::ModelConfig model = lora_llama();
  const EngineConfig config = fp8_base(base_config(Mode::kGpu));
  const TierDemand demand = engine_demand(part_shapes(model), config);
  std::uint64_t frozen = 0;
  for (const TierDemand::Item& item : demand.items[static_cast<int>(G)]) {
    if (item.role == "frozen parameters") frozen += item.bytes;
  }
  std::int64_t channels = 0;
  for (const models::ParameterSpec& spec : model.block_parameters()) {
    channels += spec.shape.size() >= 2 ? spec.shape[0] : spec.numel();
  }
  const std::uint64_t table = (static_cast<std::uint64_t>(channels) * 12 + 15) / 16 * 16;
  const std::uint64_t block = stored(table + static_cast<std::uint64_t>(model.block_parameter_count()));
  CHECK(frozen == stored(static_cast<std::uint64_t>(model.stem_parameter_count()) * 4) +
                      model.num_layers * block + stored(static_cast<std::uint64_t>(model.head_parameter_count()) * 4));

  Engine engine(models::build(model, 7), config);
  CHECK(engine.stats().store.tiers[static_cast<int>(G)].peak_bytes == demand.bytes[static_cast<int>(G)]);
  const std::string checkpoint = dir.file("checkpoint");
  auto loader = demo_loader(3);
  engine.train_step(loader->next());
  engine.save(checkpoint);
  std::ifstream in(checkpoint + "/trainer_state.json");
  const nlohmann::json state = nlohmann::json::parse(in);
  CHECK(state.at("base").at("storage") == "fp8");
  Engine compute_base(models::build(model, 7), base_config(Mode::kGpu));
  CHECK_THROWS_WITH(compute_base.load(checkpoint), Catch::Contains("\"storage\":\"fp8\""));

  CHECK_THROWS_WITH(Engine(models::build(models::preset("tiny-llama"), 7), config),
                    Catch::Contains("base storage fp8") && Catch::Contains("compute"));
  CHECK_THROWS_WITH(parse_base_storage("int4"), Catch::Contains("compute") && Catch::Contains("fp8"));
}

TEST_CASE("zo2 with LoRA over an fp8 base equals zo2 over its dequantized weights in the compute dtype") {
  TempDir dir;
  const models::ModelConfig model = lora_llama();
  EngineConfig config = base_config(Mode::kZo2);
  config.optimizer.kind = OptimizerKind::kSgd;
  config.optimizer.momentum = 0.9;
  config.zo.seed = 42;
  // The fp8 path is the same for every home but the device's (the copy a visit brings, or the
  // resident one); zo2_test.cpp streams a LoRA base from NVMe.
  SECTION("the base resident, decoded at each visit") { config.zo.block_tier = G; }
  SECTION("the base in host memory, streamed") { config.zo.block_tier = H; }
  Engine reference(dequantized_model(model), config);
  Engine engine(models::build(model, 7), fp8_base(config));
  auto reference_loader = demo_loader(3), loader = demo_loader(3);
  for (int i = 0; i < 6; ++i) {
    INFO("step " << i + 1);
    const StepResult expected = *reference.train_step(reference_loader->next());
    const StepResult result = *engine.train_step(loader->next());
    CHECK(result.loss_plus == expected.loss_plus);
    CHECK(result.loss_minus == expected.loss_minus);
    CHECK(result.projected_grads == expected.projected_grads);
  }
  reference.export_adapter(dir.file("reference-adapter"), "tiny-llama");
  engine.export_adapter(dir.file("adapter"), "tiny-llama");
  CHECK(contents(dir.file("adapter/adapter_model.safetensors")) ==
        contents(dir.file("reference-adapter/adapter_model.safetensors")));
}
