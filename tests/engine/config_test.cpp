// engine_config_from_json: the settings the CLI and the Python extension share.

#include <optional>
#include <string>
#include <vector>

#include "ferry/engine.h"

#undef CHECK
#include <catch2/catch.hpp>

using namespace ferry;

TEST_CASE("engine settings read from JSON under the CLI's names") {
  const EngineConfig config = engine_config_from_json(R"({
      "mode": "gpu", "precision": "bf16", "device": "cpu", "gpu_budget": "2GiB",
      "host_budget": 4096, "optimizer": "sgd", "lr": 0.5, "momentum": 0.9, "nesterov": true,
      "schedule": "cosine", "warmup": 3, "steps": 10, "min_lr_ratio": 0.1, "grad_accum": 2,
      "max_grad_norm": 1.0, "loss_scale": false, "keep_graph_blocks": 1,
      "offload_checkpoints": true, "optimizer_threads": 2, "trace": "run.json",
      "nvme": "/mnt/a,/mnt/b", "nvme_budget": "1GiB", "seed": 5, "zo_eps": 0.01,
      "zo_samples": 2, "zo_blocks": "nvme", "zo_host_blocks": 1, "zo_storage": "fp32",
      "zo_window": 4})");
  CHECK(config.mode == Mode::kGpu);
  CHECK(config.precision == Precision::kBF16);
  CHECK(config.device.is_cpu());
  CHECK(config.gpu_budget_bytes == 2ull << 30);
  CHECK(config.host_budget_bytes == 4096);
  CHECK(config.optimizer.kind == OptimizerKind::kSgd);
  CHECK(config.optimizer.lr == 0.5);
  CHECK(config.optimizer.momentum == 0.9);
  CHECK(config.optimizer.nesterov);
  CHECK(config.schedule.kind == LrSchedule::kCosine);
  CHECK(config.schedule.warmup_steps == 3);
  CHECK(config.schedule.total_steps == 10);
  CHECK(config.schedule.min_lr_ratio == 0.1);
  CHECK(config.grad_accumulation == 2);
  CHECK(config.max_grad_norm == 1.0);
  CHECK(config.loss_scale.enabled == std::optional<bool>(false));
  CHECK(config.keep_graph_blocks == 1);
  CHECK(config.offload_checkpoints);
  CHECK(config.optimizer_threads == 2);
  CHECK(config.trace);
  CHECK(config.nvme_directories == std::vector<std::string>{"/mnt/a", "/mnt/b"});
  CHECK(config.nvme_budget_bytes == 1ull << 30);
  CHECK(config.zo.seed == 5);
  CHECK(config.zo.eps == 0.01);
  CHECK(config.zo.samples == 2);
  CHECK(config.zo.block_tier == Tier::kNvme);
  CHECK(config.zo.host_blocks == 1);
  CHECK(config.zo.storage == std::optional<Precision>(Precision::kF32));
  CHECK(config.zo.blocks_in_flight == 4);
  CHECK(engine_config_from_json(R"({"nvme": ["/x"], "zo_storage": ""})").nvme_directories ==
        std::vector<std::string>{"/x"});
}

TEST_CASE("missing engine settings keep EngineConfig's defaults") {
  const EngineConfig config = engine_config_from_json("{}");
  const EngineConfig defaults;
  CHECK(config.mode == defaults.mode);
  CHECK(config.optimizer.lr == defaults.optimizer.lr);
  CHECK(!config.loss_scale.enabled.has_value());
  CHECK(config.device == defaults.device);
}

TEST_CASE("bad engine settings name the setting and what is valid") {
  CHECK_THROWS_WITH(engine_config_from_json(R"({"lr": "fast"})"),
                    Catch::Contains("engine setting 'lr' has the wrong type"));
  CHECK_THROWS_WITH(engine_config_from_json(R"({"learning_rate": 1})"),
                    Catch::Contains("unknown engine setting 'learning_rate'") &&
                        Catch::Contains("valid settings: mode, precision"));
  CHECK_THROWS_WITH(engine_config_from_json(R"({"mode": "warp"})"),
                    Catch::Contains("unknown mode 'warp'"));
  CHECK_THROWS_WITH(engine_config_from_json("[1, 2]"), Catch::Contains("must be a JSON object"));
  CHECK_THROWS_WITH(engine_config_from_json("{"), Catch::Contains("not valid JSON"));
  CHECK_THROWS_WITH(engine_config_from_json(R"({"device": "tpu"})"),
                    Catch::Contains("device 'tpu' is not valid"));
  CHECK_THROWS_WITH(engine_config_from_json(R"({"gpu_budget": -1})"),
                    Catch::Contains("a budget must be"));
}
