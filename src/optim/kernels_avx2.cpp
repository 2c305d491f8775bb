// AVX2 + F16C kernels: 8 fp32 lanes. Built for that ISA by the pragma below (the library itself
// targets baseline x86-64) and only called when the CPU reports both features.

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "optim/kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#pragma GCC optimize("fp-contract=off")

namespace ferry::optim::detail {
namespace {

struct Avx2Reg {
  __m256 v;
};

inline Avx2Reg operator+(Avx2Reg a, Avx2Reg b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Avx2Reg operator*(Avx2Reg a, Avx2Reg b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Avx2Reg operator/(Avx2Reg a, Avx2Reg b) { return {_mm256_div_ps(a.v, b.v)}; }

struct Avx2Lanes {
  using Reg = Avx2Reg;
  static constexpr int kWidth = 8;

  static Reg broadcast(float value) { return {_mm256_set1_ps(value)}; }
  static Reg sqrt(Reg x) { return {_mm256_sqrt_ps(x.v)}; }

  static __m256i first_lanes(int lanes) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static Reg load(const float* p, int lanes) {
    if (lanes == kWidth) return {_mm256_loadu_ps(p)};
    return {_mm256_maskload_ps(p, first_lanes(lanes))};
  }
  static void store(float* p, Reg x, int lanes) {
    if (lanes == kWidth) {
      _mm256_storeu_ps(p, x.v);
    } else {
      _mm256_maskstore_ps(p, first_lanes(lanes), x.v);
    }
  }

  // AVX2 has no masked 16-bit moves: a partial register goes through a zeroed buffer.
  static __m128i load_u16(const std::uint16_t* p, int lanes) {
    if (lanes == kWidth) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    std::uint16_t buffer[kWidth] = {};
    std::memcpy(buffer, p, sizeof(std::uint16_t) * lanes);
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(buffer));
  }
  static void store_u16(std::uint16_t* p, __m128i x, int lanes) {
    if (lanes == kWidth) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), x);
      return;
    }
    std::uint16_t buffer[kWidth];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(buffer), x);
    std::memcpy(p, buffer, sizeof(std::uint16_t) * lanes);
  }

  static Reg load_bf16(const std::uint16_t* p, int lanes) {
    const __m256i wide = _mm256_cvtepu16_epi32(load_u16(p, lanes));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))};
  }
  static Reg load_f16(const std::uint16_t* p, int lanes) {
    return {_mm256_cvtph_ps(load_u16(p, lanes))};
  }
  static void store_bf16(std::uint16_t* p, Reg x, int lanes) {
    const __m256i bits = _mm256_castps_si256(x.v);
    const __m256i high = _mm256_srli_epi32(bits, 16);
    const __m256i bias =
        _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(high, _mm256_set1_epi32(1)));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
    const __m256i quiet_nan = _mm256_or_si256(high, _mm256_set1_epi32(0x40));
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q));
    const __m256i result = _mm256_blendv_epi8(rounded, quiet_nan, is_nan);
    store_u16(p, _mm_packus_epi32(_mm256_castsi256_si128(result), _mm256_extracti128_si256(result, 1)),
              lanes);
  }
  static void store_f16(std::uint16_t* p, Reg x, int lanes) {
    store_u16(p, _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lanes);
  }

  // Lanes 0-7 of kSquareLanes come from even registers of a tile, 8-15 from odd ones.
  struct SquareSums {
    __m256d lanes[4];
    SquareSums() {
      for (__m256d& lane : lanes) lane = _mm256_setzero_pd();
    }
    void add(std::int64_t index, Reg g) {
      const int first = (index / kWidth) % 2 == 0 ? 0 : 2;
      const __m256d low = _mm256_cvtps_pd(_mm256_castps256_ps128(g.v));
      const __m256d high = _mm256_cvtps_pd(_mm256_extractf128_ps(g.v, 1));
      lanes[first] = _mm256_add_pd(lanes[first], _mm256_mul_pd(low, low));
      lanes[first + 1] = _mm256_add_pd(lanes[first + 1], _mm256_mul_pd(high, high));
    }
    double total() const {
      double values[kSquareLanes];
      for (int i = 0; i < 4; ++i) _mm256_storeu_pd(values + 4 * i, lanes[i]);
      double sum = 0.0;
      for (double value : values) sum += value;
      return sum;
    }
  };
};

}  // namespace
}  // namespace ferry::optim::detail

#include "optim/kernel_loops.h"

namespace ferry::optim::detail {

const KernelTable& avx2_kernels() { return Kernels<Avx2Lanes>::table(); }

}  // namespace ferry::optim::detail

#pragma GCC pop_options
