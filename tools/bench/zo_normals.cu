// What one pass of zo2's CUDA kernel costs over an OPT-13B block (327M bf16 weights): the
// kernel's shape (a thread per four elements, `updates` replayed updates, then the perturbed
// copy) with ferry's own normals (src/optim/zo_math.h) against cheaper math for Box-Muller, and
// a device-to-device copy of the block as the memory's bound. Decides whether the replays that
// a streamed block adds (docs/zo2.md, "Write-back interval") are worth cheaper math.
//
//   nvcc -O3 -arch=sm_90 -std=c++17 -Isrc -Iinclude tools/bench/zo_normals.cu -o /tmp/zo_normals
//   /tmp/zo_normals

#include <cuda_bf16.h>

#include <cstdio>

#include "optim/zo_math.h"

namespace {

using ferry::optim::detail::normals4;
using ferry::optim::detail::philox;
using ferry::optim::detail::Words4;

enum class Math { kFerry, kIntrinsics, kSinCosPi, kIntrinsicLogSinCosPi };

const char* name(Math math) {
  switch (math) {
    case Math::kFerry: return "ferry (logf, sinf, cosf)";
    case Math::kIntrinsics: return "__logf, __sincosf";
    case Math::kSinCosPi: return "logf, sincospif";
    case Math::kIntrinsicLogSinCosPi: return "__logf, sincospif";
  }
  return "?";
}

template <Math M>
__device__ void normals(std::uint64_t seed, std::uint64_t group, std::uint64_t stream, float out[4]) {
  if constexpr (M == Math::kFerry) {
    normals4(seed, group, stream, out);
  } else {
    const Words4 words = philox(seed, group, stream);
    constexpr float kScale = 2.3283064365386963e-10f;  // 2^-32
    for (int pair = 0; pair < 2; ++pair) {
      const float u1 = (static_cast<float>(words.w[2 * pair]) + 1.0f) * kScale;
      const float u2 = static_cast<float>(words.w[2 * pair + 1]) * kScale;
      float sine, cosine, radius;
      if constexpr (M == Math::kIntrinsics) {
        // __sincosf is accurate on [-pi, pi]: sin(a - pi) = -sin(a), cos(a - pi) = -cos(a).
        radius = sqrtf(-2.0f * __logf(u1));
        __sincosf(6.2831853071795864f * u2 - 3.14159265358979f, &sine, &cosine);
        sine = -sine;
        cosine = -cosine;
      } else if constexpr (M == Math::kSinCosPi) {
        radius = sqrtf(-2.0f * logf(u1));
        sincospif(2.0f * u2, &sine, &cosine);
      } else {
        radius = sqrtf(-2.0f * __logf(u1));
        sincospif(2.0f * u2, &sine, &cosine);
      }
      out[2 * pair] = radius * cosine;
      out[2 * pair + 1] = radius * sine;
    }
  }
}

template <Math M>
__global__ void zo_pass(__nv_bfloat16* weights, __nv_bfloat16* compute, long numel, int updates) {
  const long group = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x;
  const long begin = group * 4;
  if (begin + 4 > numel) return;
  float theta[4];
  for (int i = 0; i < 4; ++i) theta[i] = __bfloat162float(weights[begin + i]);
  for (int u = 0; u < updates; ++u) {
    float z[4];
    normals<M>(1234 + u, group, 7, z);
    for (int i = 0; i < 4; ++i) {
      weights[begin + i] = __float2bfloat16_rn(theta[i] - 1e-7f * z[i]);
      theta[i] = __bfloat162float(weights[begin + i]);
    }
  }
  float z[4];
  normals<M>(99, group, 7, z);
  for (int i = 0; i < 4; ++i) compute[begin + i] = __float2bfloat16_rn(theta[i] + 1e-3f * z[i]);
}

template <typename Launch>
float milliseconds(Launch launch) {
  constexpr int kRepeats = 10;
  cudaEvent_t start, end;
  cudaEventCreate(&start);
  cudaEventCreate(&end);
  launch();
  cudaEventRecord(start);
  for (int r = 0; r < kRepeats; ++r) launch();
  cudaEventRecord(end);
  cudaEventSynchronize(end);
  float ms = 0;
  cudaEventElapsedTime(&ms, start, end);
  cudaEventDestroy(start);
  cudaEventDestroy(end);
  return ms / kRepeats;
}

template <Math M>
float pass_ms(__nv_bfloat16* weights, __nv_bfloat16* compute, long numel, int updates) {
  const auto blocks = static_cast<unsigned>((numel / 4 + 255) / 256);
  return milliseconds([&] { zo_pass<M><<<blocks, 256>>>(weights, compute, numel, updates); });
}

}  // namespace

int main() {
  constexpr long kNumel = 327680000;  // OPT-13B: 12 x 5120^2 + biases and norms, rounded
  __nv_bfloat16 *weights = nullptr, *compute = nullptr;
  if (cudaMalloc(&weights, kNumel * 2) != cudaSuccess || cudaMalloc(&compute, kNumel * 2) != cudaSuccess) {
    std::fprintf(stderr, "zo_normals: cannot allocate 1.3 GB on the device\n");
    return 1;
  }
  cudaMemset(weights, 0, kNumel * 2);
  std::printf("one zo kernel over %ld bf16 weights, ms; updates = replayed updates before the perturbed copy\n",
              kNumel);
  std::printf("| updates | %-26s | %-26s | %-26s | %-26s |\n", name(Math::kFerry), name(Math::kIntrinsics),
              name(Math::kSinCosPi), name(Math::kIntrinsicLogSinCosPi));
  for (int updates = 0; updates <= 3; ++updates) {
    std::printf("| %7d | %26.3f | %26.3f | %26.3f | %26.3f |\n", updates,
                pass_ms<Math::kFerry>(weights, compute, kNumel, updates),
                pass_ms<Math::kIntrinsics>(weights, compute, kNumel, updates),
                pass_ms<Math::kSinCosPi>(weights, compute, kNumel, updates),
                pass_ms<Math::kIntrinsicLogSinCosPi>(weights, compute, kNumel, updates));
  }
  const float copy = milliseconds([&] { cudaMemcpyAsync(compute, weights, kNumel * 2, cudaMemcpyDeviceToDevice); });
  std::printf("device-to-device copy of the block: %.3f ms\n", copy);
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}
