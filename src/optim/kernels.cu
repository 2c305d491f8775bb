// ferry's optimizer kernels on CUDA.
//
// Adam and AdamW: the per-element arithmetic of adam_tile (kernel_loops.h) in the same order,
// each multiply, add, divide and square root rounded on its own (the _rn intrinsics are never
// contracted into multiply-adds), so a device step gives the CPU kernels' bits. One pass reads
// the gradient in its own dtype and writes the master, both moments and the low-precision copy
// that the modules compute with.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "optim/kernels.h"

namespace ferry::optim::detail {
namespace {

template <DType D>
struct Precision16;

template <>
struct Precision16<DType::kBF16> {
  __device__ static float load(const std::uint16_t* p) {
    return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(p));
  }
  __device__ static void store(std::uint16_t* p, float v) {
    *reinterpret_cast<__nv_bfloat16*>(p) = __float2bfloat16_rn(v);
  }
};

template <>
struct Precision16<DType::kF16> {
  __device__ static float load(const std::uint16_t* p) { return __half2float(*reinterpret_cast<const __half*>(p)); }
  __device__ static void store(std::uint16_t* p, float v) { *reinterpret_cast<__half*>(p) = __float2half_rn(v); }
};

template <DType kGrad>
__device__ float load_grad(const void* grad, std::int64_t i) {
  if constexpr (kGrad == DType::kF32) {
    return static_cast<const float*>(grad)[i];
  } else {
    return Precision16<kGrad>::load(static_cast<const std::uint16_t*>(grad) + i);
  }
}

// kOut == kF32 stands for "no copy".
template <DType kGrad, DType kOut>
__global__ void adam_kernel(const AdamConstants c, float* master, float* exp_avg, float* exp_avg_sq,
                            const void* grad, std::uint16_t* out, std::int64_t size) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < size; i += stride) {
    float p = master[i];
    float g = __fmul_rn(load_grad<kGrad>(grad, i), c.grad_multiplier);
    if (c.l2 != 0) g = __fadd_rn(g, __fmul_rn(c.l2, p));
    p = __fmul_rn(p, c.decay);
    const float m = __fadd_rn(__fmul_rn(exp_avg[i], c.beta1), __fmul_rn(c.one_minus_beta1, g));
    const float v = __fadd_rn(__fmul_rn(exp_avg_sq[i], c.beta2), __fmul_rn(__fmul_rn(c.one_minus_beta2, g), g));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), c.sqrt_bias_correction2), c.eps);
    p = __fadd_rn(p, __fdiv_rn(__fmul_rn(c.neg_step_size, m), denom));
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    master[i] = p;
    if constexpr (kOut != DType::kF32) Precision16<kOut>::store(out + i, p);
  }
}

template <DType kGrad, DType kOut>
void launch_typed(const AdamConstants& c, float* master, float* exp_avg, float* exp_avg_sq, const GradSpan& grad,
                  const OutputSpan& out, cudaStream_t stream) {
  constexpr int kThreads = 256;
  constexpr std::int64_t kMaxBlocks = 4096;  // a grid-stride loop covers the rest
  const std::int64_t blocks = std::min<std::int64_t>(kMaxBlocks, (grad.size + kThreads - 1) / kThreads);
  if (blocks == 0) return;
  adam_kernel<kGrad, kOut><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      c, master, exp_avg, exp_avg_sq, grad.data, out.data, grad.size);
}

template <DType kGrad>
void launch_grad(const AdamConstants& c, float* master, float* exp_avg, float* exp_avg_sq, const GradSpan& grad,
                 const OutputSpan& out, cudaStream_t stream) {
  if (out.data == nullptr) return launch_typed<kGrad, DType::kF32>(c, master, exp_avg, exp_avg_sq, grad, out, stream);
  if (out.dtype == DType::kBF16) {
    return launch_typed<kGrad, DType::kBF16>(c, master, exp_avg, exp_avg_sq, grad, out, stream);
  }
  launch_typed<kGrad, DType::kF16>(c, master, exp_avg, exp_avg_sq, grad, out, stream);
}

// The gradient's sum of squares: each of kGradStatsBlocks blocks sums a fixed grid-stride share in
// fp64 and halves it in a tree; one block then adds the partial sums the same way. A fixed grid
// and fixed trees make the result the same bits on every run (not the CPU's, which sums in
// another order), without materialising an fp64 copy of the gradient.
constexpr int kStatsThreads = 256;
constexpr int kGradStatsBlocks = static_cast<int>(kGradStatsCudaDoubles) - 2;

__device__ double block_sum(double value, double* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int half = kStatsThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) shared[threadIdx.x] += shared[threadIdx.x + half];
    __syncthreads();
  }
  return shared[0];
}

// Four loads in flight per thread (a bf16 gradient is 2 bytes an element: one load at a time
// left the kernel at a fifth of the memory's speed).
template <DType kGrad>
__global__ void partial_sum_squares(const void* grad, std::int64_t size, double* partials) {
  __shared__ double shared[kStatsThreads];
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  double sums[4] = {0, 0, 0, 0};
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < size; i += 4 * stride) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const std::int64_t at = i + k * stride;
      const double g = at < size ? static_cast<double>(load_grad<kGrad>(grad, at)) : 0.0;
      sums[k] += g * g;
    }
  }
  const double total = block_sum((sums[0] + sums[1]) + (sums[2] + sums[3]), shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

__global__ void finish_sum_squares(double* stats) {
  __shared__ double shared[kStatsThreads];
  const double* partials = stats + 2;
  double sum = 0;
  for (int i = threadIdx.x; i < kGradStatsBlocks; i += kStatsThreads) sum += partials[i];
  const double total = block_sum(sum, shared);
  if (threadIdx.x == 0) {
    stats[0] = total;
    stats[1] = isfinite(total) ? 0.0 : 1.0;
  }
}

template <DType kGrad>
void launch_stats_typed(const GradSpan& grad, double* stats, cudaStream_t stream) {
  partial_sum_squares<kGrad><<<kGradStatsBlocks, kStatsThreads, 0, stream>>>(grad.data, grad.size, stats + 2);
  finish_sum_squares<<<1, kStatsThreads, 0, stream>>>(stats);
}

}  // namespace

int launch_adam(const AdamConstants& c, float* master, float* exp_avg, float* exp_avg_sq, const GradSpan& grad,
                const OutputSpan& out, void* stream) {
  auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (grad.dtype) {
    case DType::kF32: launch_grad<DType::kF32>(c, master, exp_avg, exp_avg_sq, grad, out, cuda_stream); break;
    case DType::kBF16: launch_grad<DType::kBF16>(c, master, exp_avg, exp_avg_sq, grad, out, cuda_stream); break;
    case DType::kF16: launch_grad<DType::kF16>(c, master, exp_avg, exp_avg_sq, grad, out, cuda_stream); break;
  }
  return static_cast<int>(cudaGetLastError());
}

int launch_grad_stats(const GradSpan& grad, double* stats, void* stream) {
  auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (grad.dtype) {
    case DType::kF32: launch_stats_typed<DType::kF32>(grad, stats, cuda_stream); break;
    case DType::kBF16: launch_stats_typed<DType::kBF16>(grad, stats, cuda_stream); break;
    case DType::kF16: launch_stats_typed<DType::kF16>(grad, stats, cuda_stream); break;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace ferry::optim::detail
