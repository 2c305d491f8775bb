// Profiling: the compute a plan replays, measured on the real model before the job's plan is
// made (fuyou and auto in `ferry finetune`, auto rows of `ferry bench finetune`).

#include <algorithm>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "ferry/check.h"
#include "ferry/dist.h"
#include "ferry/plan.h"
#include "ferry/system.h"

namespace ferry {

EngineConfig profiling_config(EngineConfig config, std::int64_t blocks) {
  std::vector<BlockActivations>& activations = config.placement.activations;
  if (config.mode == Mode::kFuyou) {
    activations.assign(static_cast<std::size_t>(blocks), {true, Tier::kNvme});
    config.fuyou.host_blocks = 0;
  } else if (activations.empty()) {
    activations.assign(static_cast<std::size_t>(blocks),
                       {true, config.offload_checkpoints ? Tier::kHost : Tier::kGpu});
  } else {
    for (BlockActivations& block : activations) {
      if (!block.recompute) block = {true, Tier::kGpu};
    }
  }
  config.grad_accumulation = 1;
  config.micro_batch_order = MicroBatchOrder::kBatchMajor;  // one micro-batch has no order
  config.trace = true;
  return config;
}

namespace {

// The difference of two snapshots: what the second step alone did.
MeasuredCompute second_step(const EngineStats& first, const EngineStats& both, const data::Batch& batch) {
  MeasuredCompute measured;
  measured.batch = batch.input_ids.size(0);
  measured.seq = batch.input_ids.size(1);
  for (std::size_t part = 0; part < both.part_forward_seconds.size(); ++part) {
    measured.part_forward_seconds.push_back(both.part_forward_seconds[part] - first.part_forward_seconds[part]);
    measured.part_backward_seconds.push_back(both.part_backward_seconds[part] - first.part_backward_seconds[part]);
  }
  const double seconds = both.cpu_update_seconds - first.cpu_update_seconds;
  const auto elements = static_cast<double>(both.cpu_updated_elements - first.cpu_updated_elements);
  if (seconds > 0 && elements > 0) measured.cpu_update_params_per_s = elements / seconds;
  return measured;
}

// Note: the ranks' mean of each figure, so every rank plans alike and issues the same
// collectives (require_same_schedule). A rank that measured no CPU rate counts as none measured.
void average_over_ranks(dist::Communicator& communicator, MeasuredCompute* measured) {
  std::vector<double> figures = measured->part_forward_seconds;
  figures.insert(figures.end(), measured->part_backward_seconds.begin(), measured->part_backward_seconds.end());
  figures.push_back(measured->cpu_update_params_per_s);
  figures.push_back(measured->cpu_update_params_per_s > 0 ? 1 : 0);
  torch::Tensor summed = torch::tensor(figures, torch::kDouble);
  communicator.all_reduce_sum(summed);
  const double ranks = communicator.world_size();
  const double* sums = summed.data_ptr<double>();
  const std::size_t parts = measured->part_forward_seconds.size();
  for (std::size_t part = 0; part < parts; ++part) {
    measured->part_forward_seconds[part] = sums[part] / ranks;
    measured->part_backward_seconds[part] = sums[parts + part] / ranks;
  }
  const bool every_rank = sums[2 * parts + 1] == ranks;
  measured->cpu_update_params_per_s = every_rank ? sums[2 * parts] / ranks : 0;
}

}  // namespace

// Note: the profile's device memory goes back to the device when its engine is dropped. Left in
// the caching allocator, its blocks would be split under the job's allocations, which plan for
// an empty device.
MeasuredCompute profile_compute(LayeredModel model, const EngineConfig& config, const data::Batch& batch) {
  const auto blocks = static_cast<std::int64_t>(model.num_blocks());
  MeasuredCompute measured;
  {
    Engine engine(std::move(model), profiling_config(config, blocks));
    engine.train_step(batch);
    const EngineStats first = engine.stats();
    engine.train_step(batch);
    measured = second_step(first, engine.stats(), batch);
  }
  release_cached_gpu_memory();
  if (config.communicator) average_over_ranks(*config.communicator, &measured);
  return measured;
}

std::string measured_compute_to_json(const MeasuredCompute& measured) {
  nlohmann::json out;
  out["batch"] = measured.batch;
  out["seq"] = measured.seq;
  out["part_forward_seconds"] = measured.part_forward_seconds;
  out["part_backward_seconds"] = measured.part_backward_seconds;
  out["cpu_update_params_per_s"] = measured.cpu_update_params_per_s;
  return out.dump();
}

MeasuredCompute measured_compute_from_json(const std::string& text, const std::string& origin) {
  const nlohmann::json root = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  FERRY_CHECK(!root.is_discarded() && root.is_object(), origin, ": measured compute must be a JSON object");
  auto field = [&](const char* key) -> const nlohmann::json& {
    FERRY_CHECK(root.contains(key), origin, ": measured compute has no '", key, "'");
    return root.at(key);
  };
  auto integer = [&](const char* key) {
    FERRY_CHECK(field(key).is_number_integer(), origin, ": measured compute's '", key, "' must be an integer, got ",
                field(key).dump());
    return field(key).get<std::int64_t>();
  };
  auto seconds = [&](const char* key) {
    const nlohmann::json& list = field(key);
    FERRY_CHECK(list.is_array() && std::all_of(list.begin(), list.end(), [](const auto& v) { return v.is_number(); }),
                origin, ": measured compute's '", key, "' must be a list of seconds, got ", list.dump());
    return list.get<std::vector<double>>();
  };
  MeasuredCompute measured;
  measured.batch = integer("batch");
  measured.seq = integer("seq");
  measured.part_forward_seconds = seconds("part_forward_seconds");
  measured.part_backward_seconds = seconds("part_backward_seconds");
  if (root.contains("cpu_update_params_per_s")) {
    FERRY_CHECK(root.at("cpu_update_params_per_s").is_number(), origin,
                ": measured compute's 'cpu_update_params_per_s' must be a number, got ",
                root.at("cpu_update_params_per_s").dump());
    measured.cpu_update_params_per_s = root.at("cpu_update_params_per_s").get<double>();
  }
  return measured;
}

}  // namespace ferry
