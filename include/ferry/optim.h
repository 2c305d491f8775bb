#pragma once

// CPU optimizers on flat spans: the update an offload mode runs on the host over one bundle of
// fp32 master weights and their optimizer state. Each step is one pass over memory that also
// unscales and clips the gradient and, optionally, writes a bf16/fp16 copy of the updated
// weights ready to upload. Vectorized (AVX-512, AVX2 + F16C, scalar; chosen at run time, all
// bit-identical) and parallel over tiles with oneTBB. Safe to call from several threads at once.
//
// The update rules are those of torch.optim (AdamW, Adam, SGD, Adagrad) computed in fp32 with
// the same operation order as LibTorch's CPU kernels; docs/optim.md states the contract.

#include <cstdint>
#include <string>

namespace ferry::optim {

enum class DType : std::uint8_t { kF32, kBF16, kF16 };

const char* dtype_name(DType dtype);

// A span of fp32 values updated in place: master weights or one optimizer state.
struct FloatSpan {
  float* data = nullptr;
  std::int64_t size = 0;
};

// A read-only gradient: fp32, or bf16/fp16 given as their raw 16-bit patterns.
struct GradSpan {
  const void* data = nullptr;
  std::int64_t size = 0;
  DType dtype = DType::kF32;

  static GradSpan f32(const float* data, std::int64_t size) { return {data, size, DType::kF32}; }
  static GradSpan bf16(const std::uint16_t* data, std::int64_t size) {
    return {data, size, DType::kBF16};
  }
  static GradSpan f16(const std::uint16_t* data, std::int64_t size) {
    return {data, size, DType::kF16};
  }
};

// Where the step also writes the updated weights rounded to nearest-even in bf16 or fp16.
// Empty (data == nullptr) means no copy.
struct OutputSpan {
  std::uint16_t* data = nullptr;
  std::int64_t size = 0;
  DType dtype = DType::kBF16;
};

// Per-call context shared by all algorithms.
struct StepContext {
  std::int64_t step = 1;     // 1 for the first step; drives bias correction and SGD's first step
  double grad_scale = 1.0;   // the loss scale: gradients are divided by it
  double clip_coef = 1.0;    // gradients are multiplied by it (max_norm / norm, or 1)
  // Note: a step updates in place, so whether the gradient holds an Inf or NaN must be known
  // before the first element is written. With grad_checked_finite = false the step first reads
  // the gradient once (2 or 4 bytes per element) and skips the whole span if it finds one.
  // The engine computes grad_stats() for clipping anyway; it then passes true to save the pass.
  bool grad_checked_finite = false;
};

struct StepReport {
  bool skipped = false;  // the gradient held an Inf or NaN: nothing was written
};

struct AdamWParams {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;  // decoupled: p *= 1 - lr * weight_decay
};

struct AdamParams {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;  // L2: added to the gradient as weight_decay * p
};

struct SgdParams {
  double lr = 1e-2;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
};

struct AdagradParams {
  double lr = 1e-2;
  double lr_decay = 0.0;
  double weight_decay = 0.0;
  double eps = 1e-10;
};

// Throw ferry::Error naming the bad value and the valid range (lr < 0, a beta outside [0, 1),
// eps <= 0, ...). The step functions call them; so do the torch::optim adapters at construction.
void check_params(const AdamWParams& params);
void check_params(const AdamParams& params);
void check_params(const SgdParams& params);
void check_params(const AdagradParams& params);

StepReport adamw_step(const AdamWParams& params, const StepContext& context, FloatSpan master,
                      FloatSpan exp_avg, FloatSpan exp_avg_sq, GradSpan grad,
                      OutputSpan out = {});

StepReport adam_step(const AdamParams& params, const StepContext& context, FloatSpan master,
                     FloatSpan exp_avg, FloatSpan exp_avg_sq, GradSpan grad, OutputSpan out = {});

// The same two steps on CUDA device pointers, queued on `cuda_stream` (a cudaStream_t; nullptr is
// the legacy default stream): one pass
// over the span, with the CPU kernels' arithmetic bit for bit (no multiply-add contraction). The
// gradient must be known finite (context.grad_checked_finite), since a kernel cannot skip a span
// it has begun to write. Throws ferry::Error in a build without CUDA.
void adamw_step_cuda(const AdamWParams& params, const StepContext& context, FloatSpan master,
                     FloatSpan exp_avg, FloatSpan exp_avg_sq, GradSpan grad, OutputSpan out,
                     void* cuda_stream);
void adam_step_cuda(const AdamParams& params, const StepContext& context, FloatSpan master,
                    FloatSpan exp_avg, FloatSpan exp_avg_sq, GradSpan grad, OutputSpan out,
                    void* cuda_stream);

// momentum_buffer may be empty when params.momentum == 0. On step 1 the buffer is set to the
// gradient, as torch.optim.SGD does.
StepReport sgd_step(const SgdParams& params, const StepContext& context, FloatSpan master,
                    FloatSpan momentum_buffer, GradSpan grad, OutputSpan out = {});

// state_sum starts at torch's initial_accumulator_value (usually 0), filled by the caller.
StepReport adagrad_step(const AdagradParams& params, const StepContext& context,
                        FloatSpan master, FloatSpan state_sum, GradSpan grad,
                        OutputSpan out = {});

// The sum of squares of a raw (still scaled) gradient, accumulated in fp64 in a fixed order, so
// it is the same on every ISA and thread count. finite is false when any element is Inf or NaN.
// Sum the sum_squares of all bundles, then norm = sqrt(total) / grad_scale.
struct GradStats {
  double sum_squares = 0.0;
  bool finite = true;
};

GradStats grad_stats(GradSpan grad);

// The same on CUDA device memory, queued on `cuda_stream`, without a read back: writes the sum of
// squares to stats[0] and 1.0 when it is not finite (else 0.0) to stats[1], and uses the rest of
// the kGradStatsCudaDoubles device doubles as scratch. A fixed grid and order: one gradient gives
// the same bits on every run (the CPU's order differs). Throws ferry::Error without CUDA.
constexpr std::int64_t kGradStatsCudaDoubles = 2 + 1024;
void grad_stats_cuda(GradSpan grad, double* stats, void* cuda_stream);

// Instruction sets, fastest last. The best one the CPU supports is used unless
// FERRY_OPTIM_ISA=scalar|avx2|avx512 or set_isa() says otherwise.
enum class Isa : std::uint8_t { kScalar, kAvx2, kAvx512 };

const char* isa_name(Isa isa);
std::string missing_cpu_features(Isa isa);  // what isa needs that this CPU lacks, "" if none
bool isa_supported(Isa isa);
Isa best_isa();
Isa active_isa();
void set_isa(Isa isa);  // throws ferry::Error if the CPU lacks it
Isa parse_isa(const std::string& name);  // throws ferry::Error for an unknown name

// Worker threads for one step (0: one per core, the default). Applies to later calls.
void set_num_threads(int threads);
int num_threads();

}  // namespace ferry::optim
