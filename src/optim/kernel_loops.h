#pragma once

// The update rules, written once over a vector type V and instantiated by each
// kernels_<isa>.cpp. V provides:
//   Reg                      a register of kWidth fp32 lanes with + - * / operators
//   kWidth                   lanes per register (1 for the scalar reference)
//   broadcast(float), sqrt(Reg)
//   load(const float*, lanes), store(float*, Reg, lanes)            lanes <= kWidth
//   load_bf16 / load_f16(const uint16_t*, lanes)                    exact widening
//   store_bf16 / store_f16(uint16_t*, Reg, lanes)                   round to nearest-even
//   SquareSums{add(index, Reg), total()}                            see kSquareLanes
//
// Note: each kernels_<isa>.cpp includes this file after switching the compiler to its ISA and
// defining V in an anonymous namespace. Everything here is a template over V, so every ISA gets
// its own internal-linkage copy built for that ISA, and the linker cannot swap an AVX-512 body
// into the scalar path. A non-template inline function added here would break that.
//
// Note: the operations and their order are those of LibTorch's CPU kernels (for example
// addcdiv is p + (value * m) / denom), and no step may be fused into an FMA: that is what makes
// every ISA produce the scalar reference's bits. The ISA files turn contraction off.

#include <cstdint>

#include "optim/kernels.h"

namespace ferry::optim::detail {

// Calls body(index, lanes) for each register of the tile, the last one possibly partial. The
// body is inlined with lanes a constant kWidth on the main path.
template <class V, class Body>
inline void for_each_register(Tile tile, const Body& body) {
  std::int64_t i = tile.begin;
  for (; i + V::kWidth <= tile.end; i += V::kWidth) {
    body(i, V::kWidth);
  }
  if (i < tile.end) {
    body(i, static_cast<int>(tile.end - i));
  }
}

template <class V, DType kGrad>
inline typename V::Reg load_grad(const void* grad, std::int64_t i, int lanes) {
  if constexpr (kGrad == DType::kF32) {
    return V::load(static_cast<const float*>(grad) + i, lanes);
  } else if constexpr (kGrad == DType::kBF16) {
    return V::load_bf16(static_cast<const std::uint16_t*>(grad) + i, lanes);
  } else {
    return V::load_f16(static_cast<const std::uint16_t*>(grad) + i, lanes);
  }
}

template <class V, OutCopy kOut>
inline void store_copy(std::uint16_t* out, std::int64_t i, typename V::Reg value, int lanes) {
  if constexpr (kOut == OutCopy::kBF16) {
    V::store_bf16(out + i, value, lanes);
  } else if constexpr (kOut == OutCopy::kF16) {
    V::store_f16(out + i, value, lanes);
  }
}

// Adam and AdamW in one body: Adam has decay = 1, AdamW has l2 = 0.
template <class V, DType kGrad, OutCopy kOut>
void adam_tile(const AdamConstants& c, float* master, float* exp_avg, float* exp_avg_sq,
               const void* grad, std::uint16_t* out, Tile tile) {
  using Reg = typename V::Reg;
  const Reg grad_multiplier = V::broadcast(c.grad_multiplier);
  const Reg l2 = V::broadcast(c.l2);
  const Reg decay = V::broadcast(c.decay);
  const Reg beta1 = V::broadcast(c.beta1);
  const Reg one_minus_beta1 = V::broadcast(c.one_minus_beta1);
  const Reg beta2 = V::broadcast(c.beta2);
  const Reg one_minus_beta2 = V::broadcast(c.one_minus_beta2);
  const Reg sqrt_bias_correction2 = V::broadcast(c.sqrt_bias_correction2);
  const Reg eps = V::broadcast(c.eps);
  const Reg neg_step_size = V::broadcast(c.neg_step_size);
  for_each_register<V>(tile, [&](std::int64_t i, int lanes) {
    Reg p = V::load(master + i, lanes);
    Reg g = load_grad<V, kGrad>(grad, i, lanes) * grad_multiplier;
    g = g + l2 * p;
    p = p * decay;
    const Reg m = V::load(exp_avg + i, lanes) * beta1 + one_minus_beta1 * g;
    const Reg v = V::load(exp_avg_sq + i, lanes) * beta2 + one_minus_beta2 * g * g;
    const Reg denom = V::sqrt(v) / sqrt_bias_correction2 + eps;
    p = p + neg_step_size * m / denom;
    V::store(exp_avg + i, m, lanes);
    V::store(exp_avg_sq + i, v, lanes);
    V::store(master + i, p, lanes);
    store_copy<V, kOut>(out, i, p, lanes);
  });
}

template <class V, DType kGrad, OutCopy kOut>
void sgd_tile(const SgdConstants& c, float* master, float* momentum_buffer, const void* grad,
              std::uint16_t* out, Tile tile) {
  using Reg = typename V::Reg;
  const Reg grad_multiplier = V::broadcast(c.grad_multiplier);
  const Reg weight_decay = V::broadcast(c.weight_decay);
  const Reg momentum = V::broadcast(c.momentum);
  const Reg one_minus_dampening = V::broadcast(c.one_minus_dampening);
  const Reg neg_lr = V::broadcast(c.neg_lr);
  for_each_register<V>(tile, [&](std::int64_t i, int lanes) {
    Reg p = V::load(master + i, lanes);
    Reg d_p = load_grad<V, kGrad>(grad, i, lanes) * grad_multiplier + weight_decay * p;
    if (c.use_momentum) {
      const Reg buf = c.first_step
                          ? d_p
                          : V::load(momentum_buffer + i, lanes) * momentum +
                                one_minus_dampening * d_p;
      V::store(momentum_buffer + i, buf, lanes);
      d_p = c.nesterov ? d_p + momentum * buf : buf;
    }
    p = p + neg_lr * d_p;
    V::store(master + i, p, lanes);
    store_copy<V, kOut>(out, i, p, lanes);
  });
}

template <class V, DType kGrad, OutCopy kOut>
void adagrad_tile(const AdagradConstants& c, float* master, float* state_sum, const void* grad,
                  std::uint16_t* out, Tile tile) {
  using Reg = typename V::Reg;
  const Reg grad_multiplier = V::broadcast(c.grad_multiplier);
  const Reg weight_decay = V::broadcast(c.weight_decay);
  const Reg eps = V::broadcast(c.eps);
  const Reg neg_clr = V::broadcast(c.neg_clr);
  for_each_register<V>(tile, [&](std::int64_t i, int lanes) {
    Reg p = V::load(master + i, lanes);
    const Reg g = load_grad<V, kGrad>(grad, i, lanes) * grad_multiplier + weight_decay * p;
    const Reg sum = V::load(state_sum + i, lanes) + g * g;
    const Reg denom = V::sqrt(sum) + eps;
    p = p + neg_clr * g / denom;
    V::store(state_sum + i, sum, lanes);
    V::store(master + i, p, lanes);
    store_copy<V, kOut>(out, i, p, lanes);
  });
}

template <class V, DType kGrad>
double sum_squares_tile(const void* grad, Tile tile) {
  typename V::SquareSums sums;
  for_each_register<V>(tile, [&](std::int64_t i, int lanes) {
    sums.add(i - tile.begin, load_grad<V, kGrad>(grad, i, lanes));
  });
  return sums.total();
}

// Run-time dtype and copy kind to the template instantiation, once per tile.
template <template <DType, OutCopy> class Kernel, class... Args>
void dispatch(DType grad_dtype, const OutputSpan& out, Args&&... args) {
  const OutCopy copy = out.data == nullptr          ? OutCopy::kNone
                       : out.dtype == DType::kBF16 ? OutCopy::kBF16
                                                   : OutCopy::kF16;
  auto with_copy = [&](auto grad_tag) {
    constexpr DType kGrad = decltype(grad_tag)::value;
    switch (copy) {
      case OutCopy::kNone: return Kernel<kGrad, OutCopy::kNone>::run(args...);
      case OutCopy::kBF16: return Kernel<kGrad, OutCopy::kBF16>::run(args...);
      case OutCopy::kF16: return Kernel<kGrad, OutCopy::kF16>::run(args...);
    }
  };
  switch (grad_dtype) {
    case DType::kF32: return with_copy(std::integral_constant<DType, DType::kF32>{});
    case DType::kBF16: return with_copy(std::integral_constant<DType, DType::kBF16>{});
    case DType::kF16: return with_copy(std::integral_constant<DType, DType::kF16>{});
  }
}

template <class V>
struct Kernels {
  template <DType kGrad, OutCopy kOut>
  struct Adam {
    static void run(const AdamConstants& c, float* master, float* exp_avg, float* exp_avg_sq,
                    const GradSpan& grad, const OutputSpan& out, Tile tile) {
      adam_tile<V, kGrad, kOut>(c, master, exp_avg, exp_avg_sq, grad.data, out.data, tile);
    }
  };
  template <DType kGrad, OutCopy kOut>
  struct Sgd {
    static void run(const SgdConstants& c, float* master, float* momentum_buffer,
                    const GradSpan& grad, const OutputSpan& out, Tile tile) {
      sgd_tile<V, kGrad, kOut>(c, master, momentum_buffer, grad.data, out.data, tile);
    }
  };
  template <DType kGrad, OutCopy kOut>
  struct Adagrad {
    static void run(const AdagradConstants& c, float* master, float* state_sum,
                    const GradSpan& grad, const OutputSpan& out, Tile tile) {
      adagrad_tile<V, kGrad, kOut>(c, master, state_sum, grad.data, out.data, tile);
    }
  };

  static void adam(const AdamConstants& c, float* master, float* exp_avg, float* exp_avg_sq,
                   const GradSpan& grad, const OutputSpan& out, Tile tile) {
    dispatch<Adam>(grad.dtype, out, c, master, exp_avg, exp_avg_sq, grad, out, tile);
  }
  static void sgd(const SgdConstants& c, float* master, float* momentum_buffer,
                  const GradSpan& grad, const OutputSpan& out, Tile tile) {
    dispatch<Sgd>(grad.dtype, out, c, master, momentum_buffer, grad, out, tile);
  }
  static void adagrad(const AdagradConstants& c, float* master, float* state_sum,
                      const GradSpan& grad, const OutputSpan& out, Tile tile) {
    dispatch<Adagrad>(grad.dtype, out, c, master, state_sum, grad, out, tile);
  }
  static double sum_squares(const GradSpan& grad, Tile tile) {
    switch (grad.dtype) {
      case DType::kF32: return sum_squares_tile<V, DType::kF32>(grad.data, tile);
      case DType::kBF16: return sum_squares_tile<V, DType::kBF16>(grad.data, tile);
      case DType::kF16: return sum_squares_tile<V, DType::kF16>(grad.data, tile);
    }
    return 0.0;
  }

  static const KernelTable& table() {
    static const KernelTable kTable{&adam, &sgd, &adagrad, &sum_squares};
    return kTable;
  }
};

}  // namespace ferry::optim::detail
