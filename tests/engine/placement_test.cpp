// Placements that split every role over the three tiers against the gpu reference mode: the
// same seeds and data give the same losses and weights, bit for bit, on the CPU.

#include <map>

#include <torch/torch.h>

#include "engine/sizing.h"
#include "ferry/engine.h"
#include "ferry/model.h"
#include "ferry/safetensors.h"
#include "support/temp_dir.h"

// glog, which LibTorch includes, defines a CHECK macro of its own; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

#include "engine/training.h"

using namespace ferry;
using namespace ferry::testing;

namespace {

constexpr Tier G = Tier::kGpu, H = Tier::kHost, N = Tier::kNvme;

PartPlacement on(Tier params, Tier grads, Tier master, Tier state0, Tier state1, Tier accumulator) {
  PartPlacement home;
  home.params = params;
  home.grads = grads;
  home.master = master;
  home.states[0] = state0;
  home.states[1] = state1;
  home.accumulator = accumulator;
  return home;
}

// Six parts (stem, four blocks, head). `stem_on_gpu` chooses which of the stem and the head the
// device updates, so a tied embedding's gradients meet both kinds of update.
Placement mixed(bool stem_on_gpu) {
  const PartPlacement gpu = on(G, G, G, G, G, G);
  Placement placement;
  placement.parts = {
      stem_on_gpu ? gpu : on(G, H, N, H, N, H),
      on(G, H, N, H, N, H),  // resident, everything the CPU works on split over host and NVMe
      on(H, N, H, N, H, N),  // streamed from host memory
      gpu,                   // updated on the device between two CPU-updated blocks
      on(N, H, H, H, H, N),  // streamed from NVMe
      stem_on_gpu ? on(G, N, N, N, N, H) : gpu,
  };
  placement.activations = {{false, G}, {true, H}, {true, G}, {true, N}};
  return placement;
}

models::ModelConfig four_blocks(const std::string& preset) {
  models::ModelConfig config = models::preset(preset);
  config.num_layers = 4;
  return config;
}

struct Run {
  std::vector<StepResult> steps;
  std::map<std::string, std::vector<char>> saved;  // every tensor of a checkpoint, as bytes
};

// Streamed blocks have no weights in their modules between visits: the checkpoint (fp32 master
// weights and optimizer states) is what both runs are compared by.
Run train(const models::ModelConfig& model, const EngineConfig& config, int steps, const TempDir& dir) {
  Engine engine(models::build(model, 7), config);
  auto loader = demo_loader(11);
  Run run;
  while (static_cast<int>(run.steps.size()) < steps) {
    if (auto result = engine.train_step(loader->next())) run.steps.push_back(*result);
  }
  const std::string checkpoint = dir.file(std::string("checkpoint-") + to_string(config.mode));
  engine.save(checkpoint);
  safetensors::Checkpoint tensors(checkpoint);
  for (const std::string& name : tensors.names()) {
    std::vector<char>& bytes = run.saved[name];
    bytes.resize(tensors.tensor(name).bytes());
    tensors.read_into(name, bytes.data(), bytes.size());
  }
  return run;
}

void require_identical(const Run& a, const Run& b) {
  require_same_steps(a.steps, b.steps);
  REQUIRE(a.saved.size() == b.saved.size());
  for (const auto& [name, bytes] : a.saved) {
    INFO(name);
    REQUIRE(b.saved.count(name) == 1);
    CHECK(bytes == b.saved.at(name));
  }
}

}  // namespace

TEST_CASE("a placement split over gpu, host and nvme equals the gpu mode exactly") {
  // tiny-gpt2 ties its head to the embedding: the head's gradients reach the stem, which the
  // CPU updates there, and the device updates the head.
  const std::string preset = GENERATE("tiny-llama", "tiny-gpt2");
  const bool stem_on_gpu = preset == "tiny-llama";
  INFO(preset << (stem_on_gpu ? ", stem updated on the gpu" : ", head updated on the gpu"));
  TempDir dir;
  const models::ModelConfig model = four_blocks(preset);
  EngineConfig reference = base_config(Mode::kGpu);
  SECTION("fp32") {}
  SECTION("fp32 with accumulation, clipping and a cosine schedule") {
    reference.grad_accumulation = 2;
    reference.max_grad_norm = 0.5;
    reference.schedule = {LrSchedule::kCosine, 5, 30, 0.1};
  }
  SECTION("layer-major accumulation") {
    reference.grad_accumulation = 2;
    reference.micro_batch_order = MicroBatchOrder::kLayerMajor;
  }
  SECTION("bf16 with loss scaling") {
    reference.precision = Precision::kBF16;
    reference.loss_scale.enabled = true;
    reference.loss_scale.initial_scale = 1e39;  // overflows until it backs off: skipped steps too
    reference.loss_scale.growth_interval = 5;
  }
  reference.placement.activations = mixed(stem_on_gpu).activations;  // block 3's checkpoint on NVMe
  reference.nvme_directories = {dir.subdir("nvme")};
  EngineConfig placed = reference;
  placed.mode = Mode::kAuto;
  placed.placement = mixed(stem_on_gpu);
  const Run expected = train(model, reference, 30, dir);
  const Run got = train(model, placed, 30, dir);
  require_identical(expected, got);
  CHECK(expected.steps.back().loss < expected.steps.front().loss);
}

TEST_CASE("the presets are placements") {
  EngineConfig config = base_config(Mode::kZeroOffload);
  const Placement zero_offload = ferry::detail::resolve_placement(config, 4);
  for (const PartPlacement& home : zero_offload.parts) {
    CHECK(home.params == G);
    CHECK_FALSE(home.updated_on_gpu());
    CHECK(home.master == H);
  }
  config.mode = Mode::kFuyou;
  config.nvme_directories = {"/tmp"};
  config.fuyou.host_blocks = 1;
  const Placement fuyou = ferry::detail::resolve_placement(config, 4);
  CHECK(fuyou.parts[0].params == G);
  CHECK(fuyou.parts[1].params == H);
  CHECK(fuyou.parts[2].params == N);
  CHECK(fuyou.parts[3].params == G);
  for (const PartPlacement& home : fuyou.parts) CHECK(home.states[1] == N);
  config.mode = Mode::kAuto;
  config.placement = fuyou;
  CHECK(ferry::detail::resolve_placement(config, 4) == fuyou);
  CHECK(placement_from_json(placement_to_json(fuyou)) == fuyou);
}

TEST_CASE("a placement the engine cannot run is refused, naming the part and the role") {
  EngineConfig config = base_config(Mode::kAuto);
  config.precision = Precision::kBF16;  // a part has an fp32 master
  CHECK_THROWS_WITH(ferry::detail::resolve_placement(config, 4), Catch::Contains("mode auto") && Catch::Contains("empty"));
  config.placement.parts.assign(4, on(G, G, G, G, G, G));
  config.placement.parts[2].master = H;
  CHECK_THROWS_WITH(ferry::detail::resolve_placement(config, 4),
                    Catch::Contains("block.1 is updated on the gpu") && Catch::Contains("fp32 master"));
  config.placement.parts[2] = on(G, H, G, H, H, H);
  CHECK_THROWS_WITH(ferry::detail::resolve_placement(config, 4),
                    Catch::Contains("block.1 is updated on the cpu") && Catch::Contains("host or nvme"));
  config.placement.parts[2] = on(H, H, H, H, H, H);
  config.placement.parts[0].params = H;
  CHECK_THROWS_WITH(ferry::detail::resolve_placement(config, 4), Catch::Contains("stem's parameters must live on the gpu"));
  config.placement.parts[0] = on(G, H, N, H, H, H);
  CHECK_THROWS_WITH(ferry::detail::resolve_placement(config, 4), Catch::Contains("on nvme") && Catch::Contains("--nvme"));
  config.placement.parts.resize(3);
  CHECK_THROWS_WITH(ferry::detail::resolve_placement(config, 4), Catch::Contains("names 3 parts but the model has 4"));
  config.mode = Mode::kGpu;
  CHECK_THROWS_WITH(ferry::detail::resolve_placement(config, 4), Catch::Contains("use mode auto"));
  CHECK_THROWS_WITH(placement_from_json(R"({"parts": [{"params": "disk"}]})"),
                    Catch::Contains("part 0 (stem), params") && Catch::Contains("disk"));
}
