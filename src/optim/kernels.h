#pragma once

// The interface between the span API (optim.cpp: checks, constants, tiling, threads) and the
// per-ISA kernels (kernels_scalar.cpp, kernels_avx2.cpp, kernels_avx512.cpp). A kernel updates
// one tile [begin, end) of a span; every pointer below is the start of the whole span.

#include <cstdint>

#include "ferry/optim.h"

namespace ferry::optim::detail {

// Per-step scalars, rounded to fp32 once, as LibTorch does when it applies a double Scalar to
// an fp32 tensor.
struct AdamConstants {
  float grad_multiplier;        // clip_coef / grad_scale
  float l2;                     // Adam: grad += l2 * p; 0 for AdamW
  float decay;                  // AdamW: p *= decay (1 - lr * weight_decay); 1 for Adam
  float beta1;
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float sqrt_bias_correction2;  // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size;          // -lr / (1 - beta1^step)
};

struct SgdConstants {
  float grad_multiplier;
  float weight_decay;
  float momentum;
  float one_minus_dampening;
  float neg_lr;
  bool use_momentum;
  bool first_step;  // the momentum buffer is set to the gradient
  bool nesterov;
};

struct AdagradConstants {
  float grad_multiplier;
  float weight_decay;
  float eps;
  float neg_clr;  // -lr / (1 + (step - 1) * lr_decay)
};

// The low-precision copy of the updated weights a kernel writes, a template argument of the
// inner loops so that the loop carries no per-element branch.
enum class OutCopy { kNone, kBF16, kF16 };

struct Tile {
  std::int64_t begin;
  std::int64_t end;
};

// Note: every lane sum in grad_stats goes to one of kSquareLanes fp64 accumulators chosen by
// element index modulo kSquareLanes, whatever the vector width, and lanes are then added in
// index order. That fixes the order of every addition, so all ISAs give the same bits.
constexpr int kSquareLanes = 16;

struct KernelTable {
  void (*adam)(const AdamConstants&, float* master, float* exp_avg, float* exp_avg_sq,
               const GradSpan& grad, const OutputSpan& out, Tile tile);
  void (*sgd)(const SgdConstants&, float* master, float* momentum_buffer, const GradSpan& grad,
              const OutputSpan& out, Tile tile);
  void (*adagrad)(const AdagradConstants&, float* master, float* state_sum,
                  const GradSpan& grad, const OutputSpan& out, Tile tile);
  double (*sum_squares)(const GradSpan& grad, Tile tile);
};

const KernelTable& scalar_kernels();
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();

// kernels.cu, in builds with CUDA, on device memory, queued on `stream` (a cudaStream_t); each
// returns the launch's cudaError_t. The adam kernel over a whole span:
int launch_adam(const AdamConstants& c, float* master, float* exp_avg, float* exp_avg_sq,
                const GradSpan& grad, const OutputSpan& out, void* stream);
// grad_stats_cuda's two kernels (stats has kGradStatsCudaDoubles elements):
int launch_grad_stats(const GradSpan& grad, double* stats, void* stream);

}  // namespace ferry::optim::detail
