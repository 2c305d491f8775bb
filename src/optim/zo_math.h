#pragma once

// The per-element arithmetic of the zeroth-order kernels, shared by the CPU loop (zo.cpp) and the
// CUDA kernel (zo.cu): Philox4x32-10, Box-Muller and the update rules, all in fp32.

#include <cmath>
#include <cstdint>

#include "ferry/zo.h"

#if defined(__CUDACC__)
#define FERRY_HOST_DEVICE __host__ __device__
#else
#define FERRY_HOST_DEVICE
#endif

namespace ferry::optim::detail {

struct Words4 {
  std::uint32_t w[4];
};

FERRY_HOST_DEVICE inline std::uint32_t mul_hi(std::uint32_t a, std::uint32_t b) {
  return static_cast<std::uint32_t>((static_cast<std::uint64_t>(a) * b) >> 32);
}

// Philox4x32-10 (Salmon et al., SC'11), the generator of curand and of torch's CUDA RNG.
FERRY_HOST_DEVICE inline Words4 philox(std::uint64_t seed, std::uint64_t group, std::uint64_t stream) {
  std::uint32_t c0 = static_cast<std::uint32_t>(group), c1 = static_cast<std::uint32_t>(group >> 32);
  std::uint32_t c2 = static_cast<std::uint32_t>(stream), c3 = static_cast<std::uint32_t>(stream >> 32);
  std::uint32_t k0 = static_cast<std::uint32_t>(seed), k1 = static_cast<std::uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const std::uint32_t hi0 = mul_hi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const std::uint32_t hi1 = mul_hi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// Four standard normals from one Philox call: Box-Muller on the word pairs (0, 1) and (2, 3).
// Uniforms lie in (0, 1]: log never sees 0.
FERRY_HOST_DEVICE inline void normals4(std::uint64_t seed, std::uint64_t group, std::uint64_t stream,
                                       float out[4]) {
  const Words4 words = philox(seed, group, stream);
  constexpr float kScale = 2.3283064365386963e-10f;  // 2^-32
  constexpr float kTwoPi = 6.2831853071795864f;
  for (int pair = 0; pair < 2; ++pair) {
    const float u1 = (static_cast<float>(words.w[2 * pair]) + 1.0f) * kScale;
    const float u2 = static_cast<float>(words.w[2 * pair + 1]) * kScale;
    const float radius = sqrtf(-2.0f * logf(u1));
    const float angle = kTwoPi * u2;
    out[2 * pair] = radius * cosf(angle);
    out[2 * pair + 1] = radius * sinf(angle);
  }
}

// The updates of one pass, by value so that a CUDA kernel can take them as a parameter.
struct ZoUpdateList {
  int count = 0;
  ZoUpdate updates[kMaxZoUpdates];
};

// The update direction of element `i` before weight decay, given the four-element group's normals
// for each sample.
FERRY_HOST_DEVICE inline float zo_direction(const ZoUpdate& update, const float (*z)[4], int lane) {
  if (update.samples == 1) return update.projected_grads[0] * z[0][lane];
  float sum = 0.0f;
  for (int s = 0; s < update.samples; ++s) sum += update.projected_grads[s] * z[s][lane];
  return sum / static_cast<float>(update.samples);
}

// Note: the operation order matches torch's CPU kernels for the same update written as separate
// tensor ops (d * lr, not a fused multiply-add), so the CPU path equals a plain reference exactly.
// zo.cpp is compiled with -ffp-contract=off to keep it so on CPUs with FMA; the CUDA kernel
// fuses (nvcc's default) and agrees to rounding.
FERRY_HOST_DEVICE inline float zo_update_element(const ZoUpdate& update, float theta, float d,
                                                 bool decay, float* state0, float* state1) {
  switch (update.rule) {
    case ZoRule::kSgd: {
      if (decay && update.weight_decay != 0.0f) d = d + update.weight_decay * theta;
      if (update.momentum != 0.0f) {
        *state0 = *state0 * update.momentum + d;
        d = *state0;
      }
      return theta - d * update.lr;
    }
    case ZoRule::kAdam:
    case ZoRule::kAdamW: {
      if (decay && update.weight_decay != 0.0f) {
        if (update.rule == ZoRule::kAdam) {
          d = d + update.weight_decay * theta;
        } else {
          theta = theta * (1.0f - update.lr * update.weight_decay);
        }
      }
      *state0 = *state0 + (d - *state0) * (1.0f - update.beta1);
      *state1 = *state1 * update.beta2 + d * d * (1.0f - update.beta2);
      const float denom = sqrtf(*state1) / update.bias_correction2_sqrt + update.eps;
      return theta - (update.lr / update.bias_correction1) * (*state0 / denom);
    }
  }
  return theta;
}

}  // namespace ferry::optim::detail
