#include "ferry/zo.h"

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(FERRY_WITH_CUDA)
#include <cuda_runtime.h>
#endif

#include "ferry/check.h"
#include "optim/dispatch.h"
#include "optim/low_precision.h"
#include "optim/zo_math.h"

namespace ferry::optim {
namespace {

float load(const void* data, DType dtype, std::int64_t i) {
  switch (dtype) {
    case DType::kF32: return static_cast<const float*>(data)[i];
    case DType::kBF16: return detail::bf16_to_float(static_cast<const std::uint16_t*>(data)[i]);
    case DType::kF16: return detail::f16_to_float(static_cast<const std::uint16_t*>(data)[i]);
  }
  return 0.0f;
}

void store(void* data, DType dtype, std::int64_t i, float value) {
  switch (dtype) {
    case DType::kF32: static_cast<float*>(data)[i] = value; return;
    case DType::kBF16: static_cast<std::uint16_t*>(data)[i] = detail::float_to_bf16(value); return;
    case DType::kF16: static_cast<std::uint16_t*>(data)[i] = detail::float_to_f16(value); return;
  }
}

void check_update(const ZoTensors& tensors, const ZoUpdate& update) {
  FERRY_CHECK(update.samples >= 1 && update.samples <= kMaxZoSamples, "a zo update needs 1 to ",
              kMaxZoSamples, " samples; got ", update.samples);
  const bool needs_state0 = update.rule != ZoRule::kSgd || update.momentum != 0.0f;
  FERRY_CHECK(!needs_state0 || tensors.state0 != nullptr, "this zo update needs state0");
  FERRY_CHECK(update.rule == ZoRule::kSgd || tensors.state1 != nullptr, "adam needs state1");
}

void check_updates(const ZoTensors& tensors, const ZoUpdate* updates, int count) {
  FERRY_CHECK(count >= 0 && count <= kMaxZoUpdates, "a zo pass applies 0 to ", kMaxZoUpdates,
              " updates; got ", count);
  for (int u = 0; u < count; ++u) check_update(tensors, updates[u]);
  FERRY_CHECK(tensors.compute || count > 0, "a zo pass without an update needs a compute copy to write");
  FERRY_CHECK(!tensors.opposite || tensors.compute, "a zo pass writes an opposite copy only beside a compute copy");
  FERRY_CHECK(tensors.opposite != tensors.weights || tensors.weights_dtype == tensors.compute_dtype,
              "the opposite copy may overwrite the weights only when they are in the compute dtype");
}

// Elements [begin, end) of the part; begin is a multiple of 4.
void apply_range(const ZoTensors& tensors, const ZoUpdate* updates, int update_count,
                 const ZoPerturb& perturb, std::int64_t begin, std::int64_t end) {
  float update_z[kMaxZoUpdates][kMaxZoSamples][4];
  float perturb_z[4];
  for (std::int64_t group_start = begin; group_start < end; group_start += 4) {
    const auto group = static_cast<std::uint64_t>(group_start / 4);
    for (int u = 0; u < update_count; ++u) {
      for (int s = 0; s < updates[u].samples; ++s) {
        detail::normals4(updates[u].seeds[s], group, updates[u].stream, update_z[u][s]);
      }
    }
    if (perturb.scale != 0.0f && tensors.compute != nullptr) {
      detail::normals4(perturb.direction.seed, group, perturb.direction.stream, perturb_z);
    }
    const std::int64_t group_end = std::min(end, group_start + 4);
    for (std::int64_t i = group_start; i < group_end; ++i) {
      const int lane = static_cast<int>(i - group_start);
      float theta = load(tensors.weights, tensors.weights_dtype, i);
      for (int u = 0; u < update_count; ++u) {
        const ZoUpdate& update = updates[u];
        const float d = detail::zo_direction(update, update_z[u], lane);
        theta = detail::zo_update_element(update, theta, d, i < update.decay_count,
                                          tensors.state0 ? tensors.state0 + i : nullptr,
                                          tensors.state1 ? tensors.state1 + i : nullptr);
        // Rounded to the stored dtype after every update, as separate passes would round it.
        store(tensors.weights, tensors.weights_dtype, i, theta);
        theta = load(tensors.weights, tensors.weights_dtype, i);
      }
      if (tensors.compute == nullptr) continue;
      const float value = perturb.scale != 0.0f ? theta + perturb.scale * perturb_z[lane] : theta;
      store(tensors.compute, tensors.compute_dtype, i, value);
      if (tensors.opposite == nullptr) continue;
      const float opposite = perturb.scale != 0.0f ? theta + -perturb.scale * perturb_z[lane] : theta;
      store(tensors.opposite, tensors.compute_dtype, i, opposite);
    }
  }
}

}  // namespace

ZoUpdate zo_sgd_update(float lr, std::uint64_t seed, float projected_grad) {
  ZoUpdate update;
  update.lr = lr;
  update.samples = 1;
  update.seeds[0] = seed;
  update.projected_grads[0] = projected_grad;
  return update;
}

void zo_normals(ZoDirection direction, std::int64_t offset, float* out, std::int64_t count) {
  FERRY_CHECK(offset >= 0 && count >= 0, "zo_normals needs offset >= 0 and count >= 0");
  float group_z[4];
  for (std::int64_t i = 0; i < count;) {
    const std::int64_t element = offset + i;
    detail::normals4(direction.seed, static_cast<std::uint64_t>(element / 4), direction.stream, group_z);
    for (std::int64_t lane = element % 4; lane < 4 && i < count; ++lane, ++i) out[i] = group_z[lane];
  }
}

void zo_apply(const ZoTensors& tensors, const ZoUpdate* updates, int update_count,
              const ZoPerturb& perturb) {
  FERRY_CHECK(tensors.numel >= 0 && tensors.weights, "zo_apply needs weights");
  check_updates(tensors, updates, update_count);
  detail::parallel_tiles(tensors.numel, [&](detail::Tile tile) {
    apply_range(tensors, updates, update_count, perturb, tile.begin, tile.end);
  });
}

std::uint8_t fp8_e4m3_encode(float value) { return detail::fp8_e4m3_encode(value); }
float fp8_e4m3_decode(std::uint8_t code) { return detail::fp8_e4m3_decode(code); }

namespace {

void check_transfer(const ZoTransferCopy& transfer, std::int64_t numel) {
  FERRY_CHECK(transfer.codes != nullptr && transfer.numel == numel, "a zo transfer copy of ", numel,
              " elements needs codes for as many; got ", transfer.numel);
  if (transfer.format != ZoTransferFormat::kFp8E4M3) return;
  FERRY_CHECK(transfer.segments >= 1 && transfer.scales && transfer.segment_ends,
              "an fp8 transfer copy needs at least one segment with its scale; got ", transfer.segments);
}

// Segment s's largest magnitude: the maxima of its tiles, then theirs (max is exact in any order).
float segment_amax(const ZoTensors& stored, std::int64_t begin, std::int64_t end) {
  std::vector<float> tile_max(static_cast<std::size_t>((end - begin + detail::kTileElements - 1) /
                                                       detail::kTileElements), 0.0f);
  detail::parallel_tiles(end - begin, [&](detail::Tile tile) {
    float amax = 0.0f;
    for (std::int64_t i = begin + tile.begin; i < begin + tile.end; ++i) {
      amax = std::max(amax, std::fabs(load(stored.weights, stored.weights_dtype, i)));
    }
    tile_max[static_cast<std::size_t>(tile.begin / detail::kTileElements)] = amax;
  });
  return tile_max.empty() ? 0.0f : *std::max_element(tile_max.begin(), tile_max.end());
}

// Note: an fp8 base's segments are its output channels, a few thousand elements each, so the
// segments run side by side; a segment of many tiles splits its own work in tiles as well.
void encode_fp8(const ZoTensors& stored, const ZoTransferCopy& transfer) {
  auto* codes = static_cast<std::uint8_t*>(transfer.codes);
  std::int64_t begin = 0;
  for (int s = 0; s < transfer.segments; ++s) {
    const std::int64_t end = transfer.segment_ends[s];
    FERRY_CHECK(end >= begin && end <= transfer.numel, "fp8 transfer segment ", s, " ends at ", end,
                ": segment ends must ascend from 0 to ", transfer.numel);
    begin = end;
  }
  FERRY_CHECK(begin == transfer.numel, "fp8 transfer segments end at ", begin, "; the last must end at ",
              transfer.numel);
  detail::parallel_indices(transfer.segments, [&](std::int64_t s) {
    const std::int64_t first = s == 0 ? 0 : transfer.segment_ends[s - 1];
    const std::int64_t end = transfer.segment_ends[s];
    const float amax = segment_amax(stored, first, end);
    const float scale = amax > 0.0f ? amax / kFp8E4M3Max : 1.0f;
    transfer.scales[s] = scale;
    detail::parallel_tiles(end - first, [&](detail::Tile tile) {
      for (std::int64_t i = first + tile.begin; i < first + tile.end; ++i) {
        codes[i] = detail::fp8_e4m3_encode(load(stored.weights, stored.weights_dtype, i) / scale);
      }
    });
  });
}

float decode(const ZoTransferCopy& transfer, std::int64_t i, int& segment) {
  if (transfer.format == ZoTransferFormat::kBF16) {
    return detail::bf16_to_float(static_cast<const std::uint16_t*>(transfer.codes)[i]);
  }
  while (i >= transfer.segment_ends[segment]) ++segment;
  return detail::fp8_e4m3_decode(static_cast<const std::uint8_t*>(transfer.codes)[i]) * transfer.scales[segment];
}

}  // namespace

void zo_update_and_encode(const ZoTensors& stored, const ZoUpdate* updates, int update_count,
                          const ZoTransferCopy& transfer) {
  FERRY_CHECK(stored.numel >= 0 && stored.weights, "zo_update_and_encode needs weights");
  FERRY_CHECK(stored.compute == nullptr, "zo_update_and_encode writes the transfer copy, not a compute copy");
  check_transfer(transfer, stored.numel);
  if (transfer.format == ZoTransferFormat::kBF16) {
    // One pass: the bf16 copy is the updated weights' unperturbed compute copy.
    ZoTensors with_copy = stored;
    with_copy.compute = transfer.codes;
    with_copy.compute_dtype = DType::kBF16;
    zo_apply(with_copy, updates, update_count, {});
    return;
  }
  if (update_count > 0) zo_apply(stored, updates, update_count, {});
  encode_fp8(stored, transfer);
}

void zo_perturb_transfer(const ZoTransferCopy& transfer, void* compute, DType compute_dtype,
                         const ZoPerturb& perturb) {
  check_transfer(transfer, transfer.numel);
  FERRY_CHECK(compute != nullptr, "zo_perturb_transfer needs a compute copy to write");
  detail::parallel_tiles(transfer.numel, [&](detail::Tile tile) {
    int segment = transfer.format == ZoTransferFormat::kFp8E4M3
                      ? detail::segment_of(transfer.segment_ends, transfer.segments, tile.begin)
                      : 0;
    float z[4];
    for (std::int64_t group_start = tile.begin; group_start < tile.end; group_start += 4) {
      if (perturb.scale != 0.0f) {
        detail::normals4(perturb.direction.seed, static_cast<std::uint64_t>(group_start / 4),
                         perturb.direction.stream, z);
      }
      const std::int64_t group_end = std::min(tile.end, group_start + 4);
      for (std::int64_t i = group_start; i < group_end; ++i) {
        const float theta = decode(transfer, i, segment);
        const float value = perturb.scale != 0.0f ? theta + perturb.scale * z[i - group_start] : theta;
        store(compute, compute_dtype, i, value);
      }
    }
  });
}

#if defined(FERRY_WITH_CUDA)
namespace detail {
int launch_zo(const ZoTensors& tensors, const ZoUpdateList& updates, const ZoPerturb& perturb, void* stream);
int launch_zo_transfer(const ZoTransferCopy& transfer, void* compute, DType compute_dtype,
                       const ZoPerturb& perturb, void* stream);
}

void zo_apply_cuda(const ZoTensors& tensors, const ZoUpdate* updates, int update_count,
                   const ZoPerturb& perturb, void* cuda_stream) {
  FERRY_CHECK(tensors.numel >= 0 && tensors.weights, "zo_apply_cuda needs weights");
  check_updates(tensors, updates, update_count);
  detail::ZoUpdateList list;
  list.count = update_count;
  for (int u = 0; u < update_count; ++u) list.updates[u] = updates[u];
  const int error = detail::launch_zo(tensors, list, perturb, cuda_stream);
  FERRY_CHECK(error == 0, "the zo CUDA kernel failed to launch: ", cudaGetErrorString(static_cast<cudaError_t>(error)));
}

void zo_perturb_transfer_cuda(const ZoTransferCopy& transfer, void* compute, DType compute_dtype,
                              const ZoPerturb& perturb, void* cuda_stream) {
  check_transfer(transfer, transfer.numel);
  FERRY_CHECK(compute != nullptr, "zo_perturb_transfer_cuda needs a compute copy to write");
  const int error = detail::launch_zo_transfer(transfer, compute, compute_dtype, perturb, cuda_stream);
  FERRY_CHECK(error == 0, "the zo transfer CUDA kernel failed to launch: ",
              cudaGetErrorString(static_cast<cudaError_t>(error)));
}

bool zo_cuda_available() { return true; }
#else
void zo_apply_cuda(const ZoTensors&, const ZoUpdate*, int, const ZoPerturb&, void*) {
  throw Error("zo_apply_cuda: this ferry was built without CUDA");
}

void zo_perturb_transfer_cuda(const ZoTransferCopy&, void*, DType, const ZoPerturb&, void*) {
  throw Error("zo_perturb_transfer_cuda: this ferry was built without CUDA");
}

bool zo_cuda_available() { return false; }
#endif

}  // namespace ferry::optim
