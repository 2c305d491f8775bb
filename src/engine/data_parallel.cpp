#include "engine/data_parallel.h"

#include <algorithm>
#include <vector>

#include <torch/torch.h>

#include "ferry/check.h"

namespace ferry::detail {

int world_size(const EngineConfig& config) {
  return config.communicator ? config.communicator->world_size() : 1;
}

int rank(const EngineConfig& config) { return config.communicator ? config.communicator->rank() : 0; }

void sum_across_ranks(const EngineConfig& config, torch::Tensor& tensor) {
  if (world_size(config) > 1) config.communicator->all_reduce_sum(tensor);
}

Ranks ranks_of(const EngineConfig& config) { return {rank(config), world_size(config)}; }

Shard shard_of(const Ranks& ranks, std::int64_t numel) {
  Shard shard;
  shard.padded = (numel + ranks.world_size - 1) / ranks.world_size;
  shard.begin = std::min(numel, ranks.rank * shard.padded);
  shard.numel = std::min(shard.padded, numel - shard.begin);
  return shard;
}

void require_same_schedule(const EngineConfig& config, std::int64_t parameter_count) {
  if (world_size(config) == 1) return;
  const std::vector<double> mine{static_cast<double>(config.mode), static_cast<double>(config.grad_accumulation),
                                 static_cast<double>(config.micro_batch_order),
                                 static_cast<double>(config.zo.samples), static_cast<double>(parameter_count)};
  torch::Tensor sum = torch::tensor(mine, torch::kDouble);
  sum_across_ranks(config, sum);
  std::string error;
  for (std::size_t i = 0; i < mine.size(); ++i) {
    if (sum[static_cast<std::int64_t>(i)].item<double>() == mine[i] * world_size(config)) continue;
    error = concat("its mode ", to_string(config.mode), ", grad_accumulation ", config.grad_accumulation,
                   ", micro_batch_order ", to_string(config.micro_batch_order), ", zo samples ", config.zo.samples,
                   " or parameter count ", parameter_count, " differ from the other ranks' (every rank must "
                   "run the same schedule on the same model)");
    break;
  }
  config.communicator->agree("the ranks' engine settings", error);
}

std::string rank_file_name(const EngineConfig& config, const std::string& name) {
  if (world_size(config) == 1) return name;
  const std::size_t dot = name.rfind('.');
  const std::string stem = dot == std::string::npos ? name : name.substr(0, dot);
  const std::string extension = dot == std::string::npos ? "" : name.substr(dot);
  return stem + ".rank" + std::to_string(rank(config)) + extension;
}

}  // namespace ferry::detail
