// Data parallelism (docs/distributed.md): two ranks, each a thread with its own engine and its own
// c10d ProcessGroupGloo over a real TCPStore on loopback, each passing half of every global batch,
// against one rank passing it whole, in every placement; and against torch::optim::AdamW on a
// plain LibTorch copy of the model as the independent reference.

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "ferry/data.h"
#include "ferry/dist.h"
#include "ferry/engine.h"
#include "ferry/fs.h"
#include "ferry/io.h"
#include "ferry/model.h"
#include "ferry/safetensors.h"
#include "ferry/testing/io_fault.h"
#include "support/ranks.h"
#include "support/temp_dir.h"

// glog, which LibTorch includes, defines a CHECK macro of its own; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

using namespace ferry;
using namespace ferry::testing;

namespace {

constexpr std::int64_t kGlobalRows = 4;  // per micro-batch, over every rank
constexpr std::int64_t kSequence = 16;
constexpr std::uint64_t kModelSeed = 7;
constexpr int kSteps = 20;
constexpr std::int64_t kDistinctBatches = 4;  // seen again and again, so the loss falls

models::ModelConfig model_config() { return models::preset("tiny-llama"); }

// Micro-batch `index` of the job, all ranks' rows: random tokens, no padding, every label learned,
// so each rank's mean loss weighs its rows as the whole batch's mean does. A few batches repeat.
data::Batch global_batch(std::int64_t index) {
  return data::random_batch(kGlobalRows, kSequence, model_config().vocab_size, 1000 + index % kDistinctBatches);
}

struct Run {
  std::vector<StepResult> steps;
  std::vector<torch::Tensor> weights;  // fp32 on the CPU, after the last step
};

std::vector<torch::Tensor> weights_of(const Engine& engine) {
  std::vector<torch::Tensor> weights;
  for (const torch::Tensor& parameter : engine.model().parameters()) {
    weights.push_back(parameter.detach().to(torch::kCPU, torch::kFloat).clone());
  }
  return weights;
}

// Steps [first, last) of the job on `engine`, as rank `rank` of `world`.
Run train_on(Engine& engine, int rank, int world, int first, int last) {
  Run run;
  const std::int64_t micro = engine.config().grad_accumulation;
  for (std::int64_t i = first * micro; static_cast<int>(run.steps.size()) < last - first; ++i) {
    if (auto result = engine.train_step(data::rank_rows(global_batch(i), rank, world))) run.steps.push_back(*result);
  }
  engine.flush();
  run.weights = weights_of(engine);
  return run;
}

Run train_alone(const EngineConfig& config, int steps = kSteps) {
  Engine engine(models::build(model_config(), kModelSeed), config);
  return train_on(engine, 0, 1, 0, steps);
}

// Each rank's run; a failure on either fails the test with its rank's message.
std::vector<Run> train_two_ranks(const EngineConfig& config, int steps = kSteps) {
  std::vector<Run> runs(2);
  auto errors = run_ranks(2, [&](int rank, std::shared_ptr<dist::Communicator> communicator) {
    EngineConfig ranked = config;
    ranked.communicator = communicator;
    Engine engine(models::build(model_config(), kModelSeed), ranked);
    runs[static_cast<std::size_t>(rank)] = train_on(engine, rank, 2, 0, steps);
  });
  REQUIRE(errors == std::vector<std::string>{"", ""});
  return runs;
}

double relative_difference(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-12); }

// Note: the tolerance. Each rank's gradient is a sum over its own rows; the two sums are then
// added, where one rank alone sums all rows in one reduction. Nothing else differs: the per-token
// loss gradients are the same bits (each rank's share, 1/2, is exact). fp32 sums of the same terms
// in another order differ by a few ulps of the terms' magnitude, so the losses stay within a
// relative 1e-7 (measured) and the test allows 1e-5. Weights: where a gradient element cancels to
// near zero its relative error is large, and AdamW, which divides by sqrt(v), turns that into up
// to a fraction of lr (3e-3) per step; the largest difference measured over 20 steps is 6e-6 (a
// fifth of a percent of lr), and the test allows 3e-5, 1% of lr.
constexpr double kLossTolerance = 1e-5;
constexpr double kWeightTolerance = 3e-5;

void require_close(const Run& ranks, const Run& alone) {
  REQUIRE(ranks.steps.size() == alone.steps.size());
  for (std::size_t i = 0; i < ranks.steps.size(); ++i) {
    INFO("step " << i + 1);
    CHECK(relative_difference(ranks.steps[i].loss, alone.steps[i].loss) < kLossTolerance);
    CHECK(relative_difference(ranks.steps[i].grad_norm, alone.steps[i].grad_norm) < 1e-4);
    CHECK(ranks.steps[i].tokens == alone.steps[i].tokens);
  }
  REQUIRE(ranks.weights.size() == alone.weights.size());
  for (std::size_t i = 0; i < ranks.weights.size(); ++i) {
    INFO("parameter " << i);
    CHECK((ranks.weights[i] - alone.weights[i]).abs().max().item<double>() < kWeightTolerance);
  }
}

// Both ranks applied the same updates to the same weights: the same bits.
void require_identical_ranks(const std::vector<Run>& runs) {
  for (std::size_t i = 0; i < runs[0].steps.size(); ++i) CHECK(runs[0].steps[i].loss == runs[1].steps[i].loss);
  for (std::size_t i = 0; i < runs[0].weights.size(); ++i) CHECK(torch::equal(runs[0].weights[i], runs[1].weights[i]));
}

EngineConfig first_order_config(Mode mode, const TempDir& dir) {
  EngineConfig config;
  config.mode = mode;
  config.optimizer.lr = 3e-3;
  config.optimizer.weight_decay = 0.01;
  // Both ranks share the directory: each writes its own file.
  if (mode == Mode::kFuyou) config.nvme_directories = {dir.subdir("nvme")};
  return config;
}

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

// Every file of a checkpoint directory and its bytes.
std::map<std::string, std::string> files_in(const std::string& dir) {
  std::map<std::string, std::string> files;
  for (const std::string& name : fs::list_directory(dir)) files[name] = file_bytes(dir + "/" + name);
  return files;
}

// The fp32 tensors of one safetensors file, by name.
std::map<std::string, torch::Tensor> read_tensors(const std::string& path) {
  safetensors::Reader reader(path);
  std::map<std::string, torch::Tensor> tensors;
  for (const safetensors::TensorInfo& info : reader.header().tensors) {
    REQUIRE(info.dtype == DType::kF32);
    torch::Tensor tensor = torch::empty(info.shape, torch::kFloat);
    reader.read_into(info.name, tensor.data_ptr(), info.bytes());
    tensors[info.name] = tensor;
  }
  return tensors;
}

}  // namespace

TEST_CASE("two ranks at batch b train as one rank at batch 2b in every placement") {
  const Mode mode = GENERATE(Mode::kGpu, Mode::kZeroOffload, Mode::kFuyou);
  INFO(to_string(mode));
  TempDir dir;
  EngineConfig config = first_order_config(mode, dir);
  SECTION("plain") {}
  SECTION("with gradient accumulation and clipping") {
    config.grad_accumulation = 2;
    config.max_grad_norm = 0.5;
  }
  SECTION("layer-major accumulation") {
    config.grad_accumulation = 2;
    config.micro_batch_order = MicroBatchOrder::kLayerMajor;
  }
  const std::vector<Run> ranks = train_two_ranks(config);
  require_identical_ranks(ranks);
  require_close(ranks[0], train_alone(config));
  CHECK(ranks[0].steps.back().loss < ranks[0].steps.front().loss);
}

TEST_CASE("two ranks follow torch::optim::AdamW on a plain LibTorch model") {
  TempDir dir;
  EngineConfig config = first_order_config(Mode::kZeroOffload, dir);
  config.optimizer.weight_decay = 0;  // ferry spares norms and biases; torch's single group would not
  config.grad_accumulation = 2;
  config.max_grad_norm = 0.5;
  const std::vector<Run> ranks = train_two_ranks(config);

  LayeredModel reference = models::build(model_config(), kModelSeed);
  reference.train(true);
  std::vector<torch::Tensor> parameters = reference.parameters();
  torch::optim::AdamW adamw(parameters, torch::optim::AdamWOptions(config.optimizer.lr).weight_decay(0));
  for (int step = 0; step < kSteps; ++step) {
    adamw.zero_grad();
    double loss_sum = 0;
    for (std::int64_t m = 0; m < config.grad_accumulation; ++m) {
      data::Batch batch = global_batch(step * config.grad_accumulation + m);
      torch::Tensor loss = reference.loss(reference.forward(batch.input_ids), batch.labels);
      (loss / static_cast<double>(config.grad_accumulation)).backward();
      loss_sum += loss.item<double>();
    }
    torch::nn::utils::clip_grad_norm_(parameters, config.max_grad_norm);
    adamw.step();
    INFO("step " << step + 1);
    CHECK(relative_difference(ranks[0].steps[static_cast<std::size_t>(step)].loss,
                              loss_sum / static_cast<double>(config.grad_accumulation)) < kLossTolerance);
  }
  for (std::size_t i = 0; i < parameters.size(); ++i) {
    INFO("parameter " << i);
    CHECK((ranks[0].weights[i] - parameters[i].detach()).abs().max().item<double>() < kWeightTolerance);
  }
}

TEST_CASE("zo2 with two ranks takes the steps of one rank with the same seeds") {
  EngineConfig config;
  config.mode = Mode::kZo2;
  config.optimizer.kind = OptimizerKind::kSgd;
  config.optimizer.lr = 1e-3;
  config.zo.seed = 42;
  config.zo.samples = 2;
  config.zo.blocks_in_flight = 2;
  const std::vector<Run> ranks = train_two_ranks(config);
  require_identical_ranks(ranks);
  const Run alone = train_alone(config);
  for (std::size_t i = 0; i < alone.steps.size(); ++i) {
    INFO("step " << i + 1);
    // The mean of two ranks' mean losses against one mean: a few ulps apart (fp32 sums).
    CHECK(relative_difference(ranks[0].steps[i].loss, alone.steps[i].loss) < 1e-5);
    CHECK(ranks[0].steps[i].tokens == alone.steps[i].tokens);
  }
  for (std::size_t i = 0; i < alone.weights.size(); ++i) {
    INFO("parameter " << i);
    CHECK((ranks[0].weights[i] - alone.weights[i]).abs().max().item<double>() < 1e-5);
  }
}

TEST_CASE("a two-rank run resumes exactly, and its checkpoint trains on in one rank") {
  TempDir dir;
  EngineConfig config = first_order_config(Mode::kZeroOffload, dir);
  config.max_grad_norm = 0.5;
  const std::string checkpoint = dir.file("step-5");
  constexpr int kSaveAfter = 5, kTotal = 10;
  std::vector<Run> uninterrupted(2);
  auto errors = run_ranks(2, [&](int rank, std::shared_ptr<dist::Communicator> communicator) {
    EngineConfig ranked = config;
    ranked.communicator = communicator;
    Engine engine(models::build(model_config(), kModelSeed), ranked);
    Run first = train_on(engine, rank, 2, 0, kSaveAfter);
    engine.save(checkpoint);
    Run rest = train_on(engine, rank, 2, kSaveAfter, kTotal);
    first.steps.insert(first.steps.end(), rest.steps.begin(), rest.steps.end());
    first.weights = rest.weights;
    uninterrupted[static_cast<std::size_t>(rank)] = first;
  });
  REQUIRE(errors == std::vector<std::string>{"", ""});
  CHECK(fs::exists(checkpoint + "/optimizer.rank1.safetensors"));  // each rank wrote its shard

  SECTION("two ranks resume with the uninterrupted run's losses and weights") {
    std::vector<Run> resumed(2);
    errors = run_ranks(2, [&](int rank, std::shared_ptr<dist::Communicator> communicator) {
      EngineConfig ranked = config;
      ranked.communicator = communicator;
      Engine engine(models::build(model_config(), kModelSeed + 1), ranked);  // the weights come from the checkpoint
      engine.load(checkpoint);
      REQUIRE(engine.steps_taken() == kSaveAfter);
      resumed[static_cast<std::size_t>(rank)] = train_on(engine, rank, 2, kSaveAfter, kTotal);
    });
    REQUIRE(errors == std::vector<std::string>{"", ""});
    for (std::size_t i = 0; i < resumed[0].steps.size(); ++i) {
      INFO("step " << kSaveAfter + i + 1);
      CHECK(resumed[0].steps[i].loss == uninterrupted[0].steps[kSaveAfter + i].loss);
    }
    for (std::size_t i = 0; i < resumed[0].weights.size(); ++i) {
      CHECK(torch::equal(resumed[0].weights[i], uninterrupted[0].weights[i]));
    }
  }
  SECTION("one rank loads the two ranks' checkpoint and trains on at the global batch") {
    Engine engine(models::build(model_config(), kModelSeed + 1), config);
    engine.load(checkpoint);
    Run alone = train_on(engine, 0, 1, kSaveAfter, kTotal);
    Run tail = uninterrupted[0];
    tail.steps.erase(tail.steps.begin(), tail.steps.begin() + kSaveAfter);
    require_close(tail, alone);
  }
}

// Note: ZeRO stage 2. Each rank's optimizer states (and an fp32 master apart from the parameters)
// hold its half of every part; the parameters, gradients and staging stay whole. So the tier that
// holds the states uses half of their bytes less than one rank does, give or take each bundle's
// rounding to kIoAlignment.
TEST_CASE("each of two ranks holds half of the optimizer states on their tier") {
  const Mode mode = GENERATE(Mode::kZeroOffload, Mode::kFuyou);
  const Precision precision = GENERATE(Precision::kF32, Precision::kBF16);
  INFO(to_string(mode) << " " << to_string(precision));
  TempDir dir;
  EngineConfig config = first_order_config(mode, dir);
  config.precision = precision;
  const TierDemand alone_demand = engine_demand(part_shapes(model_config()), config);
  const Tier tier = mode == Mode::kFuyou ? Tier::kNvme : Tier::kHost;
  std::uint64_t sharded_alone = 0;  // the optimizer states' bytes and the fp32 master's, one rank
  for (const TierDemand::Item& item : alone_demand.items[static_cast<int>(tier)]) {
    if (item.role == "optimizer states" || item.role == "fp32 master") sharded_alone += item.bytes;
  }
  REQUIRE(sharded_alone > 0);
  const auto used = [&](const Engine& engine) { return engine.stats().store.tiers[static_cast<int>(tier)].used_bytes; };
  const std::uint64_t used_alone = used(Engine(models::build(model_config(), kModelSeed), config));
  std::vector<std::uint64_t> used_ranks(2);
  auto errors = run_ranks(2, [&](int rank, std::shared_ptr<dist::Communicator> communicator) {
    EngineConfig ranked = config;
    ranked.communicator = communicator;
    used_ranks[static_cast<std::size_t>(rank)] = used(Engine(models::build(model_config(), kModelSeed), ranked));
  });
  REQUIRE(errors == std::vector<std::string>{"", ""});
  const std::size_t bundles = part_shapes(model_config()).size() * 3;  // two states and a master per part
  for (std::uint64_t used_rank : used_ranks) {
    const double saved = static_cast<double>(used_alone) - static_cast<double>(used_rank);
    CHECK(std::abs(saved - static_cast<double>(sharded_alone) / 2) <= static_cast<double>(bundles * kIoAlignment));
  }
}

TEST_CASE("a one-rank checkpoint trains on in two ranks as it does in one") {
  TempDir dir;
  EngineConfig config = first_order_config(Mode::kFuyou, dir);
  config.grad_accumulation = 2;
  config.max_grad_norm = 0.5;
  const std::string checkpoint = dir.file("step-3");
  constexpr int kSaveAfter = 3, kTotal = 8;
  Engine engine(models::build(model_config(), kModelSeed), config);
  train_on(engine, 0, 1, 0, kSaveAfter);
  engine.save(checkpoint);
  const Run alone = train_on(engine, 0, 1, kSaveAfter, kTotal);
  std::vector<Run> ranks(2);
  auto errors = run_ranks(2, [&](int rank, std::shared_ptr<dist::Communicator> communicator) {
    EngineConfig ranked = config;
    ranked.communicator = communicator;
    ranked.nvme_directories = {dir.subdir("nvme-two")};
    Engine resumed(models::build(model_config(), kModelSeed + 1), ranked);
    resumed.load(checkpoint);
    ranks[static_cast<std::size_t>(rank)] = train_on(resumed, rank, 2, kSaveAfter, kTotal);
  });
  REQUIRE(errors == std::vector<std::string>{"", ""});
  require_identical_ranks(ranks);
  require_close(ranks[0], alone);
}

TEST_CASE("two ranks in bf16 keep identical weights, and their checkpoint resumes in one rank exactly") {
  TempDir dir;
  EngineConfig config = first_order_config(Mode::kZeroOffload, dir);
  config.precision = Precision::kBF16;
  config.max_grad_norm = 0.5;
  const std::string checkpoint = dir.file("step-4");
  std::vector<Run> ranks(2);
  std::vector<Run> saved(2);
  auto errors = run_ranks(2, [&](int rank, std::shared_ptr<dist::Communicator> communicator) {
    EngineConfig ranked = config;
    ranked.communicator = communicator;
    Engine engine(models::build(model_config(), kModelSeed), ranked);
    ranks[static_cast<std::size_t>(rank)] = train_on(engine, rank, 2, 0, 4);
    engine.save(checkpoint);
    saved[static_cast<std::size_t>(rank)] = train_on(engine, rank, 2, 4, 4);  // the weights as saved
  });
  REQUIRE(errors == std::vector<std::string>{"", ""});
  require_identical_ranks(ranks);
  CHECK(ranks[0].steps.back().loss < ranks[0].steps.front().loss);
  // The fp32 master gathered from both ranks' shards, read back whole by one rank.
  Engine alone(models::build(model_config(), kModelSeed + 1), config);
  alone.load(checkpoint);
  const std::vector<torch::Tensor> loaded = weights_of(alone);
  for (std::size_t i = 0; i < loaded.size(); ++i) CHECK(torch::equal(loaded[i], saved[0].weights[i]));
}

TEST_CASE("a rank that fails to start stops every rank, naming it, without hanging") {
  TempDir dir;
  EngineConfig config = first_order_config(Mode::kFuyou, dir);
  std::ofstream(dir.file("a-file")) << "not a directory";
  const auto start = std::chrono::steady_clock::now();
  auto errors = run_ranks(2, [&](int rank, std::shared_ptr<dist::Communicator> communicator) {
    EngineConfig ranked = config;
    ranked.communicator = communicator;
    if (rank == 1) ranked.nvme_directories = {dir.file("a-file/nvme")};  // under a file: never a directory
    Engine engine(models::build(model_config(), kModelSeed), ranked);
    train_on(engine, rank, 2, 0, 2);
  });
  CHECK_THAT(errors[0], Catch::Contains("engine set-up failed on rank 1") && Catch::Contains("a-file/nvme"));
  CHECK_THAT(errors[1], Catch::Contains("a-file/nvme"));
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(20));
}

// Note: the rank files against one rank's optimizer.safetensors, as an independent reference: the
// same job in one rank saves every state whole. The two runs' states differ by the order of the
// gradients' fp32 sums (see kLossTolerance): after three steps by up to a relative 1.4e-5 of a
// state's largest element (measured); the test allows 1e-4.
TEST_CASE("two ranks save each its half of the optimizer states, in a file of its own") {
  TempDir dir;
  EngineConfig config = first_order_config(Mode::kZeroOffload, dir);
  constexpr int kSaveAfter = 3;
  const std::string two = dir.file("two"), one = dir.file("one");
  auto errors = run_ranks(2, [&](int rank, std::shared_ptr<dist::Communicator> communicator) {
    EngineConfig ranked = config;
    ranked.communicator = communicator;
    Engine engine(models::build(model_config(), kModelSeed), ranked);
    train_on(engine, rank, 2, 0, kSaveAfter);
    engine.save(two);
  });
  REQUIRE(errors == std::vector<std::string>{"", ""});
  Engine alone(models::build(model_config(), kModelSeed), config);
  train_on(alone, 0, 1, 0, kSaveAfter);
  alone.save(one);

  CHECK_FALSE(fs::exists(two + "/optimizer.safetensors"));
  const nlohmann::json state = nlohmann::json::parse(file_bytes(two + "/trainer_state.json"));
  CHECK(state["world_size"] == 2);
  CHECK(state["shards"]["files"] ==
        nlohmann::json::array({"optimizer.rank0.safetensors", "optimizer.rank1.safetensors"}));
  CHECK(state["checksums"]["files"].contains("optimizer.rank1.safetensors"));
  const std::vector<safetensors::Reader> ranks = [&] {
    std::vector<safetensors::Reader> readers;
    for (int r = 0; r < 2; ++r) readers.emplace_back(two + "/optimizer.rank" + std::to_string(r) + ".safetensors");
    return readers;
  }();
  std::vector<std::int64_t> held(2, 0);
  for (const auto& [name, expected] : read_tensors(one + "/optimizer.safetensors")) {
    INFO(name);
    torch::Tensor joined = torch::full({expected.numel()}, NAN);
    std::int64_t covered = 0;
    for (int r = 0; r < 2; ++r) {
      const safetensors::TensorInfo* info = ranks[r].header().find(name);
      if (info == nullptr) continue;
      const nlohmann::json meta = nlohmann::json::parse(ranks[r].header().metadata.at(name));
      CHECK(meta["parameter"].get<std::string>() + "." + meta["state"].get<std::string>() == name);
      CHECK(meta["shape"] == nlohmann::json(expected.sizes().vec()));
      // Rank 0's elements first, rank 1's after them: together the whole parameter, once.
      CHECK(meta["begin"] == covered);
      ranks[r].read_into(name, joined.data_ptr<float>() + covered, info->bytes());
      covered = meta["end"].get<std::int64_t>();
      held[r] += info->numel();
    }
    REQUIRE(covered == expected.numel());
    const double largest = expected.abs().max().item<double>();
    CHECK((joined - expected.reshape({-1})).abs().max().item<double>() <= 1e-4 * largest);
  }
  // Each rank holds half of every part: the halves of a part differ by at most one element.
  CHECK(held[0] + held[1] > 0);
  CHECK(std::abs(held[0] - held[1]) <= static_cast<std::int64_t>(part_shapes(model_config()).size() * 2));

  SECTION("each rank reads its own file alone, and a damaged one is caught naming it") {
    std::string rank_one = file_bytes(two + "/optimizer.rank1.safetensors");
    rank_one.back() = static_cast<char>(rank_one.back() ^ 0x10);
    std::ofstream(two + "/optimizer.rank1.safetensors", std::ios::binary | std::ios::trunc) << rank_one;
    config.verify = Verify::kFull;
    errors = run_ranks(2, [&](int, std::shared_ptr<dist::Communicator> communicator) {
      EngineConfig ranked = config;
      ranked.communicator = communicator;
      Engine(models::build(model_config(), kModelSeed), ranked).load(two);
    });
    CHECK_THAT(errors[1], Catch::Contains("is corrupt") && Catch::Contains("in optimizer.rank1.safetensors"));
    // Rank 0 read nothing of rank 1's file: its error is rank 1's, not one of its own.
    CHECK_THAT(errors[0], Catch::StartsWith("load() failed on rank 1:"));
    Engine one_rank(models::build(model_config(), kModelSeed), config);
    CHECK_THROWS_WITH(one_rank.load(two), Catch::Contains("in optimizer.rank1.safetensors"));
  }
}

// Three ranks split every part where two did not, so each reads pieces of both rank files. The
// three ranks run another placement than the others (the checkpoint does not depend on it).
TEST_CASE("a two-rank checkpoint re-shards into three ranks and back into one, bit for bit") {
  const Mode three_ranks_mode = GENERATE(Mode::kGpu, Mode::kFuyou);
  INFO(to_string(three_ranks_mode));
  TempDir dir;
  EngineConfig config = first_order_config(Mode::kZeroOffload, dir);
  config.precision = Precision::kBF16;  // the fp32 master in the rank files, bf16 weights
  const std::string two = dir.file("two"), three = dir.file("three");
  auto train_and_save = [&](int world, const std::string& load, const std::string& save) {
    return run_ranks(world, [&](int rank, std::shared_ptr<dist::Communicator> communicator) {
      EngineConfig ranked = world == 3 ? first_order_config(three_ranks_mode, dir) : config;
      ranked.precision = config.precision;
      ranked.communicator = communicator;
      Engine engine(models::build(model_config(), kModelSeed), ranked);
      if (load.empty()) {
        train_on(engine, rank, world, 0, 3);
      } else {
        engine.load(load);
      }
      engine.save(save);
    });
  };
  REQUIRE(train_and_save(2, "", two) == std::vector<std::string>{"", ""});
  // The weights as the ranks computed with them, loadable as a Hugging Face model.
  CHECK(safetensors::Checkpoint(two).tensor("model.embed_tokens.weight").dtype == DType::kBF16);
  CHECK(models::from_pretrained(two).num_blocks() == models::build(model_config(), kModelSeed).num_blocks());
  REQUIRE(train_and_save(3, two, three) == std::vector<std::string>{"", "", ""});
  CHECK(fs::exists(three + "/optimizer.rank2.safetensors"));
  // One rank writes what it loaded whole (one file): the same from either checkpoint.
  auto consolidated = [&](const std::string& from) {
    Engine engine(models::build(model_config(), kModelSeed + 1), config);
    engine.load(from);
    engine.save(from + "-one");
    return std::make_pair(file_bytes(from + "-one/model.safetensors"), file_bytes(from + "-one/optimizer.safetensors"));
  };
  const auto from_two = consolidated(two);
  CHECK(from_two.second.size() > 0);
  CHECK(consolidated(three) == from_two);
}

TEST_CASE("a rank that fails to write its shard stops every rank, naming it, and the previous checkpoint stays") {
  TempDir dir;
  EngineConfig config = first_order_config(Mode::kZeroOffload, dir);
  const std::string checkpoint = dir.file("checkpoint");
  FaultInjectingEnv envs[2];
  // Which rank fails, how, and what its error names. (Made here, not by GENERATE, which keeps
  // its values across the runs of the test case and so an earlier run's directory.)
  struct Fault {
    int rank;
    std::function<void(FaultInjectingEnv&)> arm;
    std::string names;
  };
  const std::string staged = checkpoint + ".partial";
  const Fault fault =
      GENERATE(1, 0) == 1
          ? Fault{1, [](FaultInjectingEnv& env) { env.fail(IoOp::kWrite, "/optimizer.rank1.safetensors", 0, ENOSPC); },
                  "optimizer.rank1.safetensors"}
          // Rank 0's swap of the staged directory into place, after every rank has written its files.
          : Fault{0, [staged](FaultInjectingEnv& env) {
                    env.on_each_call([&env, staged](const std::string& what, const std::string& path) {
                      if (what == "rename" && path == staged) env.fail_call(EnvCall::kRename, path, EIO, 1);
                    });
                  },
                  "exchange with"};
  INFO("rank " << fault.rank << " fails: " << fault.names);
  std::map<std::string, std::string> before;
  std::vector<std::string> failures(2);
  auto errors = run_ranks(2, [&](int rank, std::shared_ptr<dist::Communicator> communicator) {
    EngineConfig ranked = config;
    ranked.communicator = communicator;
    ranked.checkpoint_env = &envs[rank];
    Engine engine(models::build(model_config(), kModelSeed), ranked);
    train_on(engine, rank, 2, 0, 1);
    engine.save(checkpoint);
    if (rank == 0) before = files_in(checkpoint);
    train_on(engine, rank, 2, 1, 2);
    if (rank == fault.rank) fault.arm(envs[rank]);
    try {
      engine.save(checkpoint);
    } catch (const std::exception& e) {
      failures[static_cast<std::size_t>(rank)] = e.what();
    }
  });
  REQUIRE(errors == std::vector<std::string>{"", ""});
  CHECK(envs[fault.rank].faults_injected() > 0);
  const int other = 1 - fault.rank;
  CHECK_THAT(failures[static_cast<std::size_t>(other)],
             Catch::StartsWith("save() failed on rank " + std::to_string(fault.rank) + ":") &&
                 Catch::Contains(fault.names));
  CHECK_THAT(failures[static_cast<std::size_t>(fault.rank)], Catch::Contains(fault.names));
  CHECK(files_in(checkpoint) == before);
  CHECK_FALSE(fs::exists(staged));
  Engine loaded(models::build(model_config(), kModelSeed + 1), config);
  loaded.load(checkpoint);
  CHECK(loaded.steps_taken() == 1);
}
