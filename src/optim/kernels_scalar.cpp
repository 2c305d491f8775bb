// The scalar reference: one lane per register, built for baseline x86-64. The vector ISAs must
// reproduce its bits exactly (tests/optim/kernels_test.cpp checks that).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "optim/kernels.h"
#include "optim/low_precision.h"

namespace ferry::optim::detail {
namespace {

struct ScalarLane {
  using Reg = float;
  static constexpr int kWidth = 1;

  static Reg broadcast(float value) { return value; }
  static Reg sqrt(Reg x) { return std::sqrt(x); }
  static Reg load(const float* p, int) { return *p; }
  static void store(float* p, Reg x, int) { *p = x; }
  static Reg load_bf16(const std::uint16_t* p, int) { return bf16_to_float(*p); }
  static Reg load_f16(const std::uint16_t* p, int) { return f16_to_float(*p); }
  static void store_bf16(std::uint16_t* p, Reg x, int) { *p = float_to_bf16(x); }
  static void store_f16(std::uint16_t* p, Reg x, int) { *p = float_to_f16(x); }

  struct SquareSums {
    double lanes[kSquareLanes] = {};
    void add(std::int64_t index, Reg g) {
      const double wide = g;
      lanes[index % kSquareLanes] += wide * wide;
    }
    double total() const {
      double sum = 0.0;
      for (double lane : lanes) sum += lane;
      return sum;
    }
  };
};

}  // namespace
}  // namespace ferry::optim::detail

#include "optim/kernel_loops.h"

namespace ferry::optim::detail {

const KernelTable& scalar_kernels() { return Kernels<ScalarLane>::table(); }

}  // namespace ferry::optim::detail
