#pragma once

// Scalar bf16/fp16 <-> fp32 conversions: the reference the vector kernels reproduce bit for bit.
// Widening is exact; narrowing rounds to nearest-even, overflows to Inf, keeps NaN a (quiet)
// NaN with its sign and top payload bits, as the F16C / AVX-512 conversion instructions do.
//
// Note: not for the kernels_avx*.cpp files. These are plain inline functions; compiled under an
// ISA pragma they could be merged by the linker into the scalar path (see kernel_loops.h).

#include <cstdint>
#include <cstring>

namespace ferry::optim::detail {

inline std::uint32_t float_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float bits_float(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline float bf16_to_float(std::uint16_t half) { return bits_float(std::uint32_t{half} << 16); }

inline std::uint16_t float_to_bf16(float value) {
  const std::uint32_t bits = float_bits(value);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {
    return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);
  }
  const std::uint32_t rounding_bias = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>((bits + rounding_bias) >> 16);
}

inline float f16_to_float(std::uint16_t half) {
  const std::uint32_t sign = std::uint32_t{half & 0x8000u} << 16;
  const std::uint32_t exponent = (half >> 10) & 0x1Fu;
  const std::uint32_t mantissa = half & 0x3FFu;
  if (exponent == 0x1F) {
    const std::uint32_t quiet = mantissa != 0 ? 0x00400000u : 0u;
    return bits_float(sign | 0x7F800000u | quiet | (mantissa << 13));
  }
  if (exponent == 0) {
    // Subnormal (or zero): mantissa * 2^-24, exact in fp32.
    return bits_float(sign | float_bits(static_cast<float>(mantissa) * 0x1p-24f));
  }
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline std::uint16_t float_to_f16(float value) {
  const std::uint32_t bits = float_bits(value);
  const auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const std::uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) {
    return static_cast<std::uint16_t>(sign | 0x7E00u | ((magnitude >> 13) & 0x3FFu));
  }
  if (magnitude >= 0x477FF000u) {  // 65520 and up round to Inf
    return static_cast<std::uint16_t>(sign | 0x7C00u);
  }
  if (magnitude >= 0x38800000u) {  // fp16 normal range, from 2^-14
    const std::uint32_t rounded = magnitude + 0xFFFu + ((magnitude >> 13) & 1u);
    return static_cast<std::uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
  }
  const std::uint32_t exponent = magnitude >> 23;
  if (exponent < 102) {  // below 2^-25: rounds to zero
    return sign;
  }
  // fp16 subnormal: the 24-bit significand shifted to units of 2^-24, ties to even.
  const std::uint32_t significand = (magnitude & 0x7FFFFFu) | 0x800000u;
  const std::uint32_t shift = 126 - exponent;
  std::uint32_t result = significand >> shift;
  const std::uint32_t remainder = significand & ((1u << shift) - 1);
  const std::uint32_t halfway = 1u << (shift - 1);
  if (remainder > halfway || (remainder == halfway && (result & 1u))) {
    ++result;
  }
  return static_cast<std::uint16_t>(sign | result);
}

}  // namespace ferry::optim::detail
