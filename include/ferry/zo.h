#pragma once

// Zeroth-order kernels (MeZO, ZO2) on flat spans: one pass over a part's weights applies the
// previous step's update and writes the perturbed copy the forward reads. The directions z are
// never stored: element i of direction (seed, stream) is regenerated where it is needed, on the
// CPU or on the GPU, from a counter-based generator. Torch-free, like the rest of optim.

#include <cstdint>

#include "ferry/optim.h"

namespace ferry::optim {

// Note: z_i for a direction is a standard normal from Philox4x32-10 keyed by `seed`, with counter
// (i / 4, stream): each counter yields four 32-bit words, which Box-Muller turns into the normals
// of elements 4k .. 4k+3. The CPU and CUDA kernels share this code, so a direction is the same on
// both up to the last-bit differences of logf/sinf/cosf between the two.
struct ZoDirection {
  std::uint64_t seed = 0;
  std::uint64_t stream = 0;  // the engine uses the part's index
};

// z_offset .. z_offset + count - 1 of a direction.
void zo_normals(ZoDirection direction, std::int64_t offset, float* out, std::int64_t count);

constexpr int kMaxZoSamples = 16;
// Updates one pass may apply in order (the steps a stored copy may lag behind).
constexpr int kMaxZoUpdates = 8;

enum class ZoRule : std::uint8_t { kSgd, kAdam, kAdamW };

// The update from one step's projected gradients g_s along directions z_s (same stream, seeds
// per sample): d = g_0 z_0 for one sample, (sum_s g_s z_s) / samples for several; weight decay on
// the elements [0, decay_count); then
//   sgd:   d += wd theta; m = momentum m + d (when momentum != 0; m starts at 0); theta -= lr d
//   adam:  d += wd theta; torch.optim.Adam's moments and bias corrections
//   adamw: theta *= 1 - lr wd; torch.optim.AdamW's moments and bias corrections
struct ZoUpdate {
  ZoRule rule = ZoRule::kSgd;
  float lr = 0;
  float weight_decay = 0;
  float momentum = 0;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float bias_correction1 = 1;       // 1 - beta1^step
  float bias_correction2_sqrt = 1;  // sqrt(1 - beta2^step)
  int samples = 0;
  std::uint64_t seeds[kMaxZoSamples] = {};
  float projected_grads[kMaxZoSamples] = {};
  std::uint64_t stream = 0;
  std::int64_t decay_count = 0;
};

// A one-sample ZO-SGD update without decay or momentum: theta -= lr * projected_grad * z(seed).
ZoUpdate zo_sgd_update(float lr, std::uint64_t seed, float projected_grad);

// compute = weights + scale * z (rounded to the compute dtype); scale 0 is a plain copy.
struct ZoPerturb {
  ZoDirection direction;
  float scale = 0;
};

// One part's tensors. weights (and the states, which are fp32) are updated in place; compute is
// written (null: only the update runs). states: sgd with momentum uses state0; adam and adamw use state0 = exp_avg and
// state1 = exp_avg_sq. opposite, when set, receives the opposite perturbation from the same z,
// weights - scale * z in the compute dtype: the two forwards of a sample from one pass. It may be
// the weights themselves (their dtype then the compute dtype), which are then lost.
struct ZoTensors {
  void* weights = nullptr;
  DType weights_dtype = DType::kF32;
  float* state0 = nullptr;
  float* state1 = nullptr;
  void* compute = nullptr;
  DType compute_dtype = DType::kF32;
  std::int64_t numel = 0;
  void* opposite = nullptr;
};

// On the CPU, parallel over tiles: applies updates[0 .. update_count) in order (each rounded to
// the weights' dtype, exactly as if applied by separate calls), then writes the compute copy.
void zo_apply(const ZoTensors& tensors, const ZoUpdate* updates, int update_count,
              const ZoPerturb& perturb);

// The same on CUDA device pointers, queued on `cuda_stream` (a cudaStream_t). Throws ferry::Error
// when ferry was built without CUDA.
void zo_apply_cuda(const ZoTensors& tensors, const ZoUpdate* updates, int update_count,
                   const ZoPerturb& perturb, void* cuda_stream);
bool zo_cuda_available();

// --- compressed transfers -----------------------------------------------------------------------

// fp8 e4m3fn, a transfer format only (an update of 1e-6 of a weight vanishes in 3 mantissa
// bits): sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities, NaN is 0x7F / 0xFF,
// the largest finite value 448. Encoding rounds to nearest even, saturates beyond +-448 and keeps
// NaN. LibTorch 1.13 has no Float8 type, so the codes travel as uint8; the CUDA kernel runs the
// same code (zo_math.h), and on [-448, 448] it equals c10::Float8_e4m3fn's conversion.
constexpr float kFp8E4M3Max = 448.0f;
std::uint8_t fp8_e4m3_encode(float value);
float fp8_e4m3_decode(std::uint8_t code);

enum class ZoTransferFormat : std::uint8_t { kBF16, kFp8E4M3 };

// A part's compressed copy, what crosses PCIe in place of its stored weights. bf16: `codes` holds
// numel bf16 values. fp8: numel codes and one fp32 scale per segment (a parameter tensor);
// segment s covers [segment_ends[s - 1], segment_ends[s]) (segment 0 from 0; the last ends at
// numel), and element i in it is decode(codes[i]) * scales[s], scales[s] = amax_s / 448 (1 for an
// all-zero segment), so that each tensor uses fp8's whole range.
struct ZoTransferCopy {
  ZoTransferFormat format = ZoTransferFormat::kBF16;
  void* codes = nullptr;
  float* scales = nullptr;                     // fp8 only
  const std::int64_t* segment_ends = nullptr;  // fp8 only
  int segments = 0;
  std::int64_t numel = 0;
};

// The host half of a compressed transfer, on the CPU: applies updates[0 .. update_count) to
// `stored` in place, exactly as zo_apply (stored.compute must be null), then writes `transfer`
// from the result. The device never sees the stored weights, so it never writes them back.
void zo_update_and_encode(const ZoTensors& stored, const ZoUpdate* updates, int update_count,
                          const ZoTransferCopy& transfer);

// The device half: compute = decode(transfer) + perturb.scale * z, rounded to compute_dtype.
void zo_perturb_transfer(const ZoTransferCopy& transfer, void* compute, DType compute_dtype,
                         const ZoPerturb& perturb);
// The same on CUDA device pointers (the codes, scales and segment ends all on the device), queued
// on `cuda_stream`. Throws ferry::Error when ferry was built without CUDA.
void zo_perturb_transfer_cuda(const ZoTransferCopy& transfer, void* compute, DType compute_dtype,
                              const ZoPerturb& perturb, void* cuda_stream);

}  // namespace ferry::optim
