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
  FERRY_CHECK(part.numel > 0, "model part '", part.name,
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

void add_bundles(Part& part, const PartPlacement& home, const EngineConfig& config,
                 const std::function<BundleId(const BundleSpec&)>& add) {
  const auto numel = static_cast<std::uint64_t>(part.numel);
  const std::uint64_t compute_bytes = numel * torch::elementSize(scalar_type(config.precision));
  part.params = add({part.name + ".params", compute_bytes, home.params});
  part.grads = add({part.name + ".grads", compute_bytes, home.grads});
  if (config.precision != Precision::kF32) part.master = add({part.name + ".master", numel * 4, home.master});
  const int state_count = optimizer_state_count(config.optimizer);
  for (int i = 0; i < state_count; ++i) {
    part.states.push_back(add({part.name + ".state" + std::to_string(i), numel * 4, home.states[i]}));
  }
  if (config.grad_accumulation > 1) {
    part.accumulator = add({part.name + ".accumulator", numel * 4, home.accumulator});
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

void bind_parameters(const Part& part, const torch::Tensor& flat) {
  for (const ParameterSlice& slice : part.slices) {
    slice.parameter.set_data(flat.narrow(0, slice.offset, slice.numel).view(slice.shape));
  }
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
