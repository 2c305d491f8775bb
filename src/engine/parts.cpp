#include "engine/parts.h"

#include <algorithm>

#if FERRY_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

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
      part.frozen_channels += slice.shape.size() >= 2 ? slice.shape[0] : slice.numel;
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

std::uint64_t fp8_table_bytes(const Part& part) {
  constexpr std::uint64_t kCodesAlignment = 16;
  const std::uint64_t table = static_cast<std::uint64_t>(part.frozen_channels) * (sizeof(std::int64_t) + sizeof(float));
  return (table + kCodesAlignment - 1) / kCodesAlignment * kCodesAlignment;
}

}  // namespace

bool fp8_frozen(const Part& part, const EngineConfig& config) {
  return config.base_storage == BaseStorage::kFp8 && part.kind == models::Part::kBlock && part.frozen_numel > 0;
}

std::uint64_t frozen_bytes(const Part& part, const EngineConfig& config) {
  const auto numel = static_cast<std::uint64_t>(part.frozen_numel);
  if (fp8_frozen(part, config)) return fp8_table_bytes(part) + numel;
  return numel * torch::elementSize(scalar_type(config.precision));
}

optim::ZoTransferCopy fp8_frozen_copy(const Part& part, void* bundle) {
  auto* bytes = static_cast<std::uint8_t*>(bundle);
  optim::ZoTransferCopy copy;
  copy.format = optim::ZoTransferFormat::kFp8E4M3;
  copy.numel = part.frozen_numel;
  copy.segments = static_cast<int>(part.frozen_channels);
  copy.segment_ends = reinterpret_cast<const std::int64_t*>(bytes);
  copy.scales = reinterpret_cast<float*>(bytes + sizeof(std::int64_t) * static_cast<std::size_t>(part.frozen_channels));
  copy.codes = bytes + fp8_table_bytes(part);
  return copy;
}

torch::Tensor decode_fp8_frozen(const Part& part, void* bundle, torch::ScalarType dtype, torch::Device device) {
  torch::Tensor decoded = torch::empty({part.frozen_numel}, torch::TensorOptions().dtype(dtype).device(device));
  const optim::DType out = dtype == torch::kBFloat16 ? optim::DType::kBF16
                           : dtype == torch::kHalf   ? optim::DType::kF16
                                                     : optim::DType::kF32;
  const optim::ZoTransferCopy codes = fp8_frozen_copy(part, bundle);
#if FERRY_WITH_CUDA
  if (device.is_cuda()) {
    optim::zo_perturb_transfer_cuda(codes, decoded.data_ptr(), out, {},
                                    c10::cuda::getCurrentCUDAStream(device.index()).stream());
    return decoded;
  }
#endif
  FERRY_CHECK(!device.is_cuda(), "an fp8 base on ", device.str(), " needs ferry built with CUDA");
  optim::zo_perturb_transfer(codes, decoded.data_ptr(), out, {});
  return decoded;
}

torch::Tensor encode_fp8_frozen(const Part& part, const torch::Tensor& values) {
  FERRY_CHECK(part.frozen_channels <= INT32_MAX, "an fp8 base keeps at most ", INT32_MAX,
              " output channels per block; ", part.name, " has ", part.frozen_channels);
  torch::Tensor weights = values.to(torch::kFloat).contiguous();
  torch::Tensor bytes = torch::zeros({static_cast<std::int64_t>(fp8_table_bytes(part)) + part.frozen_numel},
                                     torch::kByte);
  auto* ends = reinterpret_cast<std::int64_t*>(bytes.data_ptr());
  std::int64_t c = 0;
  for (const ParameterSlice& slice : part.frozen_slices) {
    const std::int64_t channels = slice.shape.size() >= 2 ? slice.shape[0] : slice.numel;
    const std::int64_t length = channels > 0 ? slice.numel / channels : 0;
    for (std::int64_t k = 0; k < channels; ++k) ends[c++] = slice.offset + (k + 1) * length;
  }
  FERRY_ASSERT(c == part.frozen_channels, "counted ", part.frozen_channels, " frozen channels in ", part.name,
               ", laid out ", c);
  optim::ZoTensors stored;
  stored.weights = weights.data_ptr();
  stored.weights_dtype = optim::DType::kF32;
  stored.numel = part.frozen_numel;
  optim::zo_update_and_encode(stored, nullptr, 0, fp8_frozen_copy(part, bytes.data_ptr()));
  return bytes;
}

void check_base_storage(const std::vector<Part>& parts, const EngineConfig& config) {
  FERRY_CHECK(config.base_storage == BaseStorage::kCompute ||
                  std::any_of(parts.begin(), parts.end(), [&](const Part& part) { return fp8_frozen(part, config); }),
              "base storage fp8 stores the blocks' frozen parameters (a LoRA base), but no block has any: "
              "add LoRA (lora rank > 0) or use base storage compute");
}

void write_frozen(Store& store, const Part& part, const EngineConfig& config, const torch::Tensor& values) {
  torch::NoGradGuard no_grad;
  const Tier home = store.spec(part.frozen).home;
  const Tier tier = home == Tier::kNvme ? Tier::kHost : home;
  if (tier != home) store.allocate(part.frozen, tier);
  if (fp8_frozen(part, config)) {
    const torch::Tensor bytes = encode_fp8_frozen(part, values);
    typed_view(store, part.frozen, tier, torch::kByte, bytes.numel()).copy_(bytes);
  } else {
    typed_view(store, part.frozen, tier, scalar_type(config.precision), part.frozen_numel).copy_(values.reshape({-1}));
  }
  store.mark_dirty(part.frozen, tier);
  if (tier == home) return;
  store.write_back(part.frozen, tier, home).wait();
  store.evict(part.frozen, tier);
}

torch::Tensor read_frozen(Store& store, const Part& part, const EngineConfig& config) {
  if (part.frozen == kNoBundle) return torch::empty({0}, torch::kFloat);
  const Tier home = store.spec(part.frozen).home;
  const Tier tier = home == Tier::kNvme ? Tier::kHost : home;
  const bool absent = store.state(part.frozen, tier) == CopyState::kAbsent;
  store.fetch(part.frozen, tier).wait();
  torch::Tensor values;
  if (fp8_frozen(part, config)) {
    const auto bytes = static_cast<std::int64_t>(frozen_bytes(part, config));
    torch::Tensor codes = typed_view(store, part.frozen, tier, torch::kByte, bytes).to(torch::kCPU, false, true);
    values = decode_fp8_frozen(part, codes.data_ptr(), torch::kFloat, torch::kCPU);
  } else {
    values = typed_view(store, part.frozen, tier, scalar_type(config.precision), part.frozen_numel)
                 .to(torch::kCPU, torch::kFloat, false, true);
  }
  if (absent) store.evict(part.frozen, tier);
  return values;
}

void bind_frozen_device_copy(const Store& store, const Part& part, const EngineConfig& config, bool in_flight) {
  if (part.frozen == kNoBundle) return;
  const torch::ScalarType dtype = scalar_type(config.precision);
  if (!fp8_frozen(part, config)) {
    bind_frozen(part, in_flight ? typed_device_view(store, part.frozen, dtype, part.frozen_numel)
                                : typed_view(store, part.frozen, Tier::kGpu, dtype, part.frozen_numel));
    return;
  }
  void* bundle = in_flight ? store.device_tensor_in_flight(part.frozen).data_ptr()
                           : store.tensor(part.frozen, Tier::kGpu).data_ptr();
  bind_frozen(part, decode_fp8_frozen(part, bundle, dtype, config.device));
}

void unbind_frozen(const Part& part, const EngineConfig& config) {
  for (const ParameterSlice& slice : part.frozen_slices) {
    slice.parameter.set_data(
        torch::empty({0}, torch::TensorOptions().dtype(scalar_type(config.precision)).device(config.device)));
  }
}

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
    part.frozen = add(spec("frozen", frozen_bytes(part, config), home.params, pools.window), "frozen parameters");
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
