// AVX-512 (F, BW, VL) kernels: 16 fp32 lanes, masked loads and stores for the last register.
//
// Note: AVX512_BF16's VCVTNEPS2BF16 is not used for the bf16 copy. It flushes fp32 denormals to
// zero, so its output would differ from round-to-nearest-even of the master (and from the
// scalar and AVX2 paths) for tiny weights; the integer rounding below costs nothing at memory
// bandwidth.

// GCC 12's AVX-512 intrinsic headers trip a false -Wmaybe-uninitialized (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "optim/kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
#pragma GCC optimize("fp-contract=off")

namespace ferry::optim::detail {
namespace {

struct Avx512Reg {
  __m512 v;
};

inline Avx512Reg operator+(Avx512Reg a, Avx512Reg b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Avx512Reg operator*(Avx512Reg a, Avx512Reg b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Avx512Reg operator/(Avx512Reg a, Avx512Reg b) { return {_mm512_div_ps(a.v, b.v)}; }

struct Avx512Lanes {
  using Reg = Avx512Reg;
  static constexpr int kWidth = 16;

  static __mmask16 first_lanes(int lanes) {
    return static_cast<__mmask16>((1u << lanes) - 1);
  }

  static Reg broadcast(float value) { return {_mm512_set1_ps(value)}; }
  static Reg sqrt(Reg x) { return {_mm512_sqrt_ps(x.v)}; }

  static Reg load(const float* p, int lanes) {
    if (lanes == kWidth) return {_mm512_loadu_ps(p)};
    return {_mm512_maskz_loadu_ps(first_lanes(lanes), p)};
  }
  static void store(float* p, Reg x, int lanes) {
    if (lanes == kWidth) {
      _mm512_storeu_ps(p, x.v);
    } else {
      _mm512_mask_storeu_ps(p, first_lanes(lanes), x.v);
    }
  }
  static __m256i load_u16(const std::uint16_t* p, int lanes) {
    if (lanes == kWidth) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm256_maskz_loadu_epi16(first_lanes(lanes), p);
  }
  static void store_u16(std::uint16_t* p, __m256i x, int lanes) {
    if (lanes == kWidth) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x);
    } else {
      _mm256_mask_storeu_epi16(p, first_lanes(lanes), x);
    }
  }

  static Reg load_bf16(const std::uint16_t* p, int lanes) {
    const __m512i wide = _mm512_cvtepu16_epi32(load_u16(p, lanes));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16))};
  }
  static Reg load_f16(const std::uint16_t* p, int lanes) {
    return {_mm512_cvtph_ps(load_u16(p, lanes))};
  }
  static void store_bf16(std::uint16_t* p, Reg x, int lanes) {
    const __m512i bits = _mm512_castps_si512(x.v);
    const __m512i high = _mm512_srli_epi32(bits, 16);
    const __m512i bias =
        _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(high, _mm512_set1_epi32(1)));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
    const __m512i quiet_nan = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
    const __mmask16 is_nan = _mm512_cmp_ps_mask(x.v, x.v, _CMP_UNORD_Q);
    store_u16(p, _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(is_nan, rounded, quiet_nan)), lanes);
  }
  static void store_f16(std::uint16_t* p, Reg x, int lanes) {
    store_u16(p, _mm512_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lanes);
  }

  // One register covers all kSquareLanes: low 8 lanes and high 8 lanes in fp64.
  struct SquareSums {
    __m512d low;
    __m512d high;
    SquareSums() : low(_mm512_setzero_pd()), high(_mm512_setzero_pd()) {}
    void add(std::int64_t, Reg g) {
      const __m512d g_low = _mm512_cvtps_pd(_mm512_castps512_ps256(g.v));
      const __m512d g_high =
          _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(g.v), 1)));
      low = _mm512_add_pd(low, _mm512_mul_pd(g_low, g_low));
      high = _mm512_add_pd(high, _mm512_mul_pd(g_high, g_high));
    }
    double total() const {
      double values[kSquareLanes];
      _mm512_storeu_pd(values, low);
      _mm512_storeu_pd(values + 8, high);
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

const KernelTable& avx512_kernels() { return Kernels<Avx512Lanes>::table(); }

}  // namespace ferry::optim::detail

#pragma GCC pop_options
#pragma GCC diagnostic pop
