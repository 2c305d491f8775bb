#pragma once

// The per-element arithmetic of the zeroth-order kernels, shared by the CPU loop (zo.cpp) and the
// CUDA kernel (zo.cu): Philox4x32-10, Box-Muller, the update rules (all in fp32) and the fp8
// e4m3fn transfer codec.

#include <cmath>
#include <cstdint>
#include <cstring>

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

// --- fp8 e4m3fn ---------------------------------------------------------------------------------

FERRY_HOST_DEVICE inline std::uint32_t bits_of(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
#endif
}

FERRY_HOST_DEVICE inline float float_of(std::uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
#endif
}

// Note: c10::Float8_e4m3fn's rounding (fp8e4m3fn_from_fp32_value), but saturating: from 448 up
// the code is 448, where c10 gives NaN from 464 (448 and half an ulp) up. Below 2^-6 (the
// smallest normal) the codes are multiples of 2^-9: adding 2^14, whose fp32 ulp is 2^-9, rounds
// to one of them (nearest even, fp32's own rounding) and leaves it in the low mantissa bits.
// Above, adding 2^19 - 1 plus the kept mantissa's lowest bit rounds the 23 mantissa bits to 3,
// nearest even, carrying into the exponent when needed.
FERRY_HOST_DEVICE inline std::uint8_t fp8_e4m3_encode(float value) {
  std::uint32_t bits = bits_of(value);
  const auto sign = static_cast<std::uint8_t>((bits >> 24) & 0x80u);
  bits &= 0x7FFFFFFFu;
  if (bits > 0x7F800000u) return sign | 0x7Fu;   // NaN
  if (bits >= 0x43E00000u) return sign | 0x7Eu;  // 448 and above (Inf included): 448
  constexpr std::uint32_t kSubnormalBias = 141u << 23;  // 2^14
  if (bits < (121u << 23)) {
    const std::uint32_t rounded = bits_of(float_of(bits) + float_of(kSubnormalBias));
    return sign | static_cast<std::uint8_t>(rounded - kSubnormalBias);
  }
  const std::uint32_t odd = (bits >> 20) & 1u;
  bits -= 120u << 23;  // rebias the exponent: 127 -> 7
  bits += 0x7FFFFu + odd;
  return sign | static_cast<std::uint8_t>(bits >> 20);
}

FERRY_HOST_DEVICE inline float fp8_e4m3_decode(std::uint8_t code) {
  const std::uint32_t sign = static_cast<std::uint32_t>(code & 0x80u) << 24;
  const std::uint32_t exponent = (code >> 3) & 0xFu;
  const std::uint32_t mantissa = code & 0x7u;
  if (exponent == 0xFu && mantissa == 0x7u) return float_of(sign | 0x7FC00000u);
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 0.001953125f;  // mantissa * 2^-9, exact
    return float_of(sign | bits_of(magnitude));
  }
  return float_of(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

// The segment holding element i: the first s with ends[s] > i.
FERRY_HOST_DEVICE inline int segment_of(const std::int64_t* ends, int count, std::int64_t i) {
  int low = 0, high = count - 1;
  while (low < high) {
    const int middle = (low + high) / 2;
    if (ends[middle] > i) {
      high = middle;
    } else {
      low = middle + 1;
    }
  }
  return low;
}

}  // namespace ferry::optim::detail
