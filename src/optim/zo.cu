// The zeroth-order kernels on CUDA: the same per-element arithmetic as the CPU loops (zo_math.h),
// one thread per group of four elements, so one Philox call serves four normals.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "optim/zo_math.h"

namespace ferry::optim::detail {
namespace {

template <DType D>
struct Element;

template <>
struct Element<DType::kF32> {
  using T = float;
  __device__ static float load(const T* p) { return *p; }
  __device__ static void store(T* p, float v) { *p = v; }
};

template <>
struct Element<DType::kBF16> {
  using T = __nv_bfloat16;
  __device__ static float load(const T* p) { return __bfloat162float(*p); }
  __device__ static void store(T* p, float v) { *p = __float2bfloat16_rn(v); }
};

template <>
struct Element<DType::kF16> {
  using T = __half;
  __device__ static float load(const T* p) { return __half2float(*p); }
  __device__ static void store(T* p, float v) { *p = __float2half_rn(v); }
};

// Note: the update list is a kernel parameter (about 2 KiB, under CUDA's 4 KiB limit), so no
// copy to the device precedes the launch. Each update's normals are drawn when it is applied,
// keeping one update's worth of registers live.
template <DType W, DType C>
__global__ void zo_kernel(typename Element<W>::T* weights, float* state0, float* state1,
                          typename Element<C>::T* compute, typename Element<C>::T* opposite,
                          std::int64_t numel, const ZoUpdateList updates, ZoPerturb perturb) {
  const std::int64_t group = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  const std::int64_t begin = group * 4;
  if (begin >= numel) return;
  const std::int64_t end = begin + 4 < numel ? begin + 4 : numel;
  float theta[4];
  for (std::int64_t i = begin; i < end; ++i) theta[i - begin] = Element<W>::load(weights + i);
  for (int u = 0; u < updates.count; ++u) {
    const ZoUpdate& update = updates.updates[u];
    float update_z[kMaxZoSamples][4];
    for (int s = 0; s < update.samples; ++s) {
      normals4(update.seeds[s], static_cast<std::uint64_t>(group), update.stream, update_z[s]);
    }
    for (std::int64_t i = begin; i < end; ++i) {
      const int lane = static_cast<int>(i - begin);
      const float d = zo_direction(update, update_z, lane);
      const float updated = zo_update_element(update, theta[lane], d, i < update.decay_count,
                                              state0 ? state0 + i : nullptr, state1 ? state1 + i : nullptr);
      Element<W>::store(weights + i, updated);
      theta[lane] = Element<W>::load(weights + i);
    }
  }
  float perturb_z[4] = {0, 0, 0, 0};
  if (perturb.scale != 0.0f && compute != nullptr) {
    normals4(perturb.direction.seed, static_cast<std::uint64_t>(group), perturb.direction.stream, perturb_z);
  }
  if (compute == nullptr) return;
  for (std::int64_t i = begin; i < end; ++i) {
    const int lane = static_cast<int>(i - begin);
    const float value = perturb.scale != 0.0f ? theta[lane] + perturb.scale * perturb_z[lane] : theta[lane];
    Element<C>::store(compute + i, value);
    if (opposite == nullptr) continue;
    const float mirrored = perturb.scale != 0.0f ? theta[lane] + -perturb.scale * perturb_z[lane] : theta[lane];
    Element<C>::store(opposite + i, mirrored);
  }
}

template <DType W, DType C>
void launch_typed(const ZoTensors& t, const ZoUpdateList& updates, const ZoPerturb& perturb,
                  cudaStream_t stream) {
  constexpr int kThreads = 256;
  const std::int64_t groups = (t.numel + 3) / 4;
  const auto blocks = static_cast<unsigned>((groups + kThreads - 1) / kThreads);
  if (blocks == 0) return;
  auto* weights = static_cast<typename Element<W>::T*>(t.weights);
  auto* compute = static_cast<typename Element<C>::T*>(t.compute);
  auto* opposite = static_cast<typename Element<C>::T*>(t.opposite);
  zo_kernel<W, C><<<blocks, kThreads, 0, stream>>>(weights, t.state0, t.state1, compute, opposite, t.numel,
                                                    updates, perturb);
}

template <DType W>
void launch_weights(const ZoTensors& t, const ZoUpdateList& updates, const ZoPerturb& perturb,
                    cudaStream_t stream) {
  switch (t.compute_dtype) {
    case DType::kF32: return launch_typed<W, DType::kF32>(t, updates, perturb, stream);
    case DType::kBF16: return launch_typed<W, DType::kBF16>(t, updates, perturb, stream);
    case DType::kF16: return launch_typed<W, DType::kF16>(t, updates, perturb, stream);
  }
}

// The device half of a compressed transfer: one thread per group of four elements, as zo_kernel.
template <ZoTransferFormat F, DType C>
__global__ void zo_transfer_kernel(const void* codes, const float* scales, const std::int64_t* segment_ends,
                                   int segments, typename Element<C>::T* compute, std::int64_t numel,
                                   ZoPerturb perturb) {
  const std::int64_t group = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  const std::int64_t begin = group * 4;
  if (begin >= numel) return;
  const std::int64_t end = begin + 4 < numel ? begin + 4 : numel;
  float z[4] = {0, 0, 0, 0};
  if (perturb.scale != 0.0f) {
    normals4(perturb.direction.seed, static_cast<std::uint64_t>(group), perturb.direction.stream, z);
  }
  int segment = F == ZoTransferFormat::kFp8E4M3 ? segment_of(segment_ends, segments, begin) : 0;
  for (std::int64_t i = begin; i < end; ++i) {
    float theta;
    if constexpr (F == ZoTransferFormat::kBF16) {
      theta = __bfloat162float(static_cast<const __nv_bfloat16*>(codes)[i]);
    } else {
      while (i >= segment_ends[segment]) ++segment;
      theta = fp8_e4m3_decode(static_cast<const std::uint8_t*>(codes)[i]) * scales[segment];
    }
    const float value = perturb.scale != 0.0f ? theta + perturb.scale * z[i - begin] : theta;
    Element<C>::store(compute + i, value);
  }
}

template <ZoTransferFormat F, DType C>
void launch_transfer_typed(const ZoTransferCopy& t, void* compute, const ZoPerturb& perturb, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const std::int64_t groups = (t.numel + 3) / 4;
  const auto blocks = static_cast<unsigned>((groups + kThreads - 1) / kThreads);
  if (blocks == 0) return;
  zo_transfer_kernel<F, C><<<blocks, kThreads, 0, stream>>>(
      t.codes, t.scales, t.segment_ends, t.segments, static_cast<typename Element<C>::T*>(compute), t.numel,
      perturb);
}

template <ZoTransferFormat F>
void launch_transfer_format(const ZoTransferCopy& t, void* compute, DType compute_dtype, const ZoPerturb& perturb,
                            cudaStream_t stream) {
  switch (compute_dtype) {
    case DType::kF32: return launch_transfer_typed<F, DType::kF32>(t, compute, perturb, stream);
    case DType::kBF16: return launch_transfer_typed<F, DType::kBF16>(t, compute, perturb, stream);
    case DType::kF16: return launch_transfer_typed<F, DType::kF16>(t, compute, perturb, stream);
  }
}

}  // namespace

// Returns the launch's cudaError_t (as int, so the caller needs no CUDA headers).
int launch_zo_transfer(const ZoTransferCopy& t, void* compute, DType compute_dtype, const ZoPerturb& perturb,
                       void* stream) {
  auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (t.format) {
    case ZoTransferFormat::kBF16:
      launch_transfer_format<ZoTransferFormat::kBF16>(t, compute, compute_dtype, perturb, cuda_stream);
      break;
    case ZoTransferFormat::kFp8E4M3:
      launch_transfer_format<ZoTransferFormat::kFp8E4M3>(t, compute, compute_dtype, perturb, cuda_stream);
      break;
  }
  return static_cast<int>(cudaGetLastError());
}

// Returns the launch's cudaError_t (as int, so the caller needs no CUDA headers).
int launch_zo(const ZoTensors& t, const ZoUpdateList& updates, const ZoPerturb& perturb, void* stream) {
  auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (t.weights_dtype) {
    case DType::kF32: launch_weights<DType::kF32>(t, updates, perturb, cuda_stream); break;
    case DType::kBF16: launch_weights<DType::kBF16>(t, updates, perturb, cuda_stream); break;
    case DType::kF16: launch_weights<DType::kF16>(t, updates, perturb, cuda_stream); break;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace ferry::optim::detail
