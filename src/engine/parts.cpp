#include "engine/parts.h"

#include "engine/update.h"
#include "ferry/check.h"

namespace ferry::detail {
namespace {

Part describe(std::string name, models::Part kind, std::int64_t index, torch::nn::Module& module) {
  Part part;
  part.name = std::move(name);
  part.kind = kind;
  part.index = index;
  std::vector<ParameterSlice> decayed, not_decayed;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    ParameterSlice slice;
    slice.name = item.key();
    slice.parameter = item.value();
    slice.shape = item.value().sizes().vec();
    slice.numel = item.value().numel();
    if (!slice.parameter.requires_grad()) {
      slice.offset = part.frozen_numel;
      part.frozen_numel += slice.numel;
      part.frozen_slices.push_back(std::move(slice));
      continue;
    }
    (is_no_decay(slice.name, slice.parameter) ? not_decayed : decayed).push_back(std::move(slice));
  }
  for (auto* group : {&decayed, &not_decayed}) {
    for (ParameterSlice& slice : *group) {
      slice.offset = part.numel;
      part.numel += slice.numel;
      if (group == &decayed) part.decay_numel += slice.numel;
      part.slices.push_back(std::move(slice));
    }
  }
  FERRY_CHECK(part.numel + part.frozen_numel > 0, "model part '", part.name,
              "' has no parameters; every part the engine drives must own at least one");
  return part;
}

}  // namespace

std::vector<Part> describe_parts(const LayeredModel& model) {
  std::vector<Part> parts;
  parts.push_back(describe("stem", models::Part::kStem, 0, *model.stem()));
  for (std::size_t i = 0; i < model.num_blocks(); ++i) {
    parts.push_back(describe("block." + std::to_string(i), models::Part::kBlock,
                             static_cast<std::int64_t>(i), *model.blocks()[i]));
  }
  parts.push_back(describe("head", models::Part::kHead, 0, *model.head()));
  return parts;
}

torch::ScalarType scalar_type(Precision precision) {
  switch (precision) {
    case Precision::kF32: return torch::kFloat;
    case Precision::kBF16: return torch::kBFloat16;
    case Precision::kF16: return torch::kHalf;
  }
  return torch::kFloat;
}

void add_bundles(Part& part, const PartPlacement& home, const EngineConfig& config, const StepPools& pools,
                 const AddBundle& add) {
  const auto numel = static_cast<std::uint64_t>(part.numel);
  const std::uint64_t compute_bytes = numel * torch::elementSize(scalar_type(config.precision));
  // Copies away from home: host staging of what lives on NVMe, and the device copies the step brings in.
  auto spec = [&](const char* role, std::uint64_t bytes, Tier tier, PoolId on_gpu) {
    BundleSpec out{part.name + "." + role, bytes, tier};
    out.pools[static_cast<int>(Tier::kGpu)] = on_gpu;
    if (tier == Tier::kNvme) out.pools[static_cast<int>(Tier::kHost)] = pools.nvme_staging;
    return out;
  };
  if (part.frozen_numel > 0) {
    const std::uint64_t frozen_bytes = static_cast<std::uint64_t>(part.frozen_numel) *
                                       torch::elementSize(scalar_type(config.precision));
    part.frozen = add(spec("frozen", frozen_bytes, home.params, pools.window), "frozen parameters");
  }
  if (!part.trainable()) return;
  BundleSpec params = spec("params", compute_bytes, home.params, pools.window);
  if (home.params == Tier::kGpu) params.pools[static_cast<int>(Tier::kHost)] = pools.parameter_staging;
  part.params = add(params, "parameters");
  part.grads = add(spec("grads", compute_bytes, home.grads, pools.device_gradients), "gradients");
  const auto shard_bytes = static_cast<std::uint64_t>(part.shard.numel) * 4;
  if (config.precision != Precision::kF32) {
    part.master = add(spec("master", shard_bytes, home.master, kNoPool), "fp32 master");
  }
  const int state_count = optimizer_state_count(config.optimizer);
  for (int i = 0; i < state_count; ++i) {
    const std::string role = "state" + std::to_string(i);
    part.states.push_back(add(spec(role.c_str(), shard_bytes, home.states[i], kNoPool), "optimizer states"));
  }
  if (config.grad_accumulation > 1) {
    part.accumulator = add(spec("accumulator", numel * 4, home.accumulator, pools.device_sums), "gradient accumulator");
  }
}

torch::Tensor device_padding_mask(const torch::Tensor& mask, torch::Device device) {
  if (!mask.defined()) return {};
  if (mask.device().is_cpu() && mask.ne(0).all().item<bool>()) return {};
  return mask.to(device);
}

void move_buffers(const LayeredModel& model, torch::Device device) {
  auto move = [&](torch::nn::Module& module) {
    for (auto& buffer : module.buffers(/*recurse=*/true)) buffer.set_data(buffer.data().to(device));
  };
  move(*model.stem());
  for (const auto& block : model.blocks()) move(*block);
  move(*model.head());
}

namespace {
void bind_slices(const std::vector<ParameterSlice>& slices, const torch::Tensor& flat) {
  for (const ParameterSlice& slice : slices) {
    slice.parameter.set_data(flat.narrow(0, slice.offset, slice.numel).view(slice.shape));
  }
}
}  // namespace

void bind_parameters(const Part& part, const torch::Tensor& flat) { bind_slices(part.slices, flat); }
void bind_frozen(const Part& part, const torch::Tensor& flat) { bind_slices(part.frozen_slices, flat); }

torch::Tensor pack_slices(const std::vector<ParameterSlice>& slices, std::int64_t numel) {
  torch::NoGradGuard no_grad;
  torch::Tensor flat = torch::empty({numel}, torch::kFloat);
  for (const ParameterSlice& slice : slices) {
    flat.narrow(0, slice.offset, slice.numel).copy_(slice.parameter.detach().reshape({-1}));
  }
  return flat;
}

namespace {
torch::Tensor as_typed(const torch::Tensor& bytes, torch::ScalarType dtype, std::int64_t numel) {
  const std::int64_t size = static_cast<std::int64_t>(torch::elementSize(dtype));
  return bytes.narrow(0, 0, numel * size).view(dtype);
}
}  // namespace

torch::Tensor typed_view(const Store& store, BundleId id, Tier tier, torch::ScalarType dtype,
                         std::int64_t numel) {
  return as_typed(store.tensor(id, tier), dtype, numel);
}

torch::Tensor typed_device_view(const Store& store, BundleId id, torch::ScalarType dtype,
                                std::int64_t numel) {
  return as_typed(store.device_tensor_in_flight(id), dtype, numel);
}

}  // namespace ferry::detail
