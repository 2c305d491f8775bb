// ferry's CUDA kernels against their CPU versions. The Adam/AdamW step: the same bits, for every
// gradient dtype and low-precision copy, with weight decay, clipping and a loss scale. zo2's
// compressed-transfer decode: the same bits without a perturbation. The gradient's sum of squares:
// the CPU's up to the order of the fp64 sum, the same bits on every run. Runs on the GPU machine;
// without CUDA it checks the refusal.

#include <limits>
#include <optional>

#include <torch/cuda.h>
#include <torch/types.h>

#include "ferry/optim.h"
#include "ferry/zo.h"
#include "support/catch.h"
#include "support/skip.h"

namespace ferry::optim {
namespace {

struct Spans {
  torch::Tensor master, exp_avg, exp_avg_sq, grad, out;

  FloatSpan span(const torch::Tensor& t) const { return {t.data_ptr<float>(), t.numel()}; }
  GradSpan grad_span() const {
    const DType dtype = grad.scalar_type() == torch::kFloat      ? DType::kF32
                        : grad.scalar_type() == torch::kBFloat16 ? DType::kBF16
                                                                 : DType::kF16;
    return {grad.data_ptr(), grad.numel(), dtype};
  }
  OutputSpan out_span() const {
    if (!out.defined()) return {};
    return {static_cast<std::uint16_t*>(out.data_ptr()), out.numel(),
            out.scalar_type() == torch::kBFloat16 ? DType::kBF16 : DType::kF16};
  }
  Spans to(torch::Device device) const {
    return {master.to(device), exp_avg.to(device), exp_avg_sq.to(device), grad.to(device),
            out.defined() ? out.to(device) : torch::Tensor()};
  }
};

Spans make_spans(std::int64_t numel, torch::ScalarType grad_dtype, std::optional<torch::ScalarType> out_dtype) {
  torch::manual_seed(7);
  Spans spans{torch::randn({numel}), torch::randn({numel}) * 0.1, torch::rand({numel}) * 0.01,
              (torch::randn({numel}) * 1e3).to(grad_dtype), torch::Tensor()};
  if (out_dtype) spans.out = torch::zeros({numel}, *out_dtype);
  return spans;
}

void step(const Spans& spans, const StepContext& context, bool decoupled, bool on_device) {
  const AdamWParams adamw{1e-3, 0.9, 0.999, 1e-8, 0.1};
  const AdamParams adam{1e-3, 0.9, 0.999, 1e-8, 0.1};
  const FloatSpan master = spans.span(spans.master), m = spans.span(spans.exp_avg), v = spans.span(spans.exp_avg_sq);
  // nullptr: the legacy default stream, which torch's copies here use too.
  if (decoupled && on_device) adamw_step_cuda(adamw, context, master, m, v, spans.grad_span(), spans.out_span(), nullptr);
  if (decoupled && !on_device) adamw_step(adamw, context, master, m, v, spans.grad_span(), spans.out_span());
  if (!decoupled && on_device) adam_step_cuda(adam, context, master, m, v, spans.grad_span(), spans.out_span(), nullptr);
  if (!decoupled && !on_device) adam_step(adam, context, master, m, v, spans.grad_span(), spans.out_span());
}

void require_same_bits(const torch::Tensor& cpu, const torch::Tensor& device) {
  if (!cpu.defined()) return;
  const torch::Tensor back = device.to(torch::kCPU);
  REQUIRE(torch::equal(cpu.view({-1}).view(torch::kShort), back.view({-1}).view(torch::kShort)));
}

TEST_CASE("the CUDA Adam and AdamW steps give the CPU kernels' bits", "[optim][cuda]") {
  const StepContext context{3, 1024.0, 0.5, true};
  if (!torch::cuda::is_available()) {
    Spans spans = make_spans(16, torch::kFloat, std::nullopt);
    CHECK_THROWS_WITH(step(spans, context, true, true), Catch::Contains("built without CUDA"));
    ferry::testing::skip("no CUDA device: the device comparison runs on the GPU machine");
    return;
  }
  const torch::Device cuda(torch::kCUDA, 0);
  for (torch::ScalarType grad_dtype : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
    for (std::optional<torch::ScalarType> out_dtype :
         {std::optional<torch::ScalarType>(), std::optional(torch::kBFloat16), std::optional(torch::kHalf)}) {
      for (bool decoupled : {true, false}) {
        CAPTURE(grad_dtype, out_dtype.has_value(), decoupled);
        Spans cpu = make_spans(100003, grad_dtype, out_dtype);
        Spans device = cpu.to(cuda);
        for (int i = 0; i < 3; ++i) {
          step(cpu, context, decoupled, false);
          step(device, context, decoupled, true);
        }
        require_same_bits(cpu.master, device.master);
        require_same_bits(cpu.exp_avg, device.exp_avg);
        require_same_bits(cpu.exp_avg_sq, device.exp_avg_sq);
        require_same_bits(cpu.out, device.out);
      }
    }
  }
}

TEST_CASE("a CUDA step refuses a gradient not known finite", "[optim][cuda]") {
  Spans spans = make_spans(16, torch::kFloat, std::nullopt);
  CHECK_THROWS_WITH(step(spans, StepContext{1, 1.0, 1.0, false}, true, true),
                    Catch::Contains("must be known finite"));
}


// A compressed copy of `weights`, encoded on the CPU as zo2's host worker does; segments of
// uneven lengths, one of them all zero.
struct EncodedTransfer {
  ZoTransferFormat format;
  torch::Tensor codes, scales, segment_ends;

  ZoTransferCopy copy() const {
    ZoTransferCopy transfer{format, codes.data_ptr(), nullptr, nullptr, 0, codes.numel()};
    if (format == ZoTransferFormat::kFp8E4M3) {
      transfer.scales = scales.data_ptr<float>();
      transfer.segment_ends = segment_ends.data_ptr<std::int64_t>();
      transfer.segments = static_cast<int>(segment_ends.numel());
    }
    return transfer;
  }
  EncodedTransfer to(torch::Device device) const {
    return {format, codes.to(device), scales.to(device), segment_ends.to(device)};
  }
};

EncodedTransfer encode(torch::Tensor weights, ZoTransferFormat format) {
  const std::int64_t n = weights.numel();
  EncodedTransfer encoded{format,
                          torch::empty({n}, format == ZoTransferFormat::kBF16 ? torch::kBFloat16 : torch::kByte),
                          torch::empty({3}, torch::kFloat), torch::tensor({n / 3, n / 3 + 100, n}, torch::kLong)};
  weights.narrow(0, n / 3, 100).zero_();
  ZoTensors stored{weights.data_ptr(), DType::kF32, nullptr, nullptr, nullptr, DType::kF32, n};
  zo_update_and_encode(stored, nullptr, 0, encoded.copy());
  return encoded;
}

TEST_CASE("the CUDA transfer decode gives the CPU's bits, and with a perturbation its rounding", "[zo][cuda]") {
  const std::int64_t n = 3 * 65536 + 77;
  torch::manual_seed(3);
  const torch::Tensor weights = torch::randn({n}) * 0.02;
  for (ZoTransferFormat format : {ZoTransferFormat::kBF16, ZoTransferFormat::kFp8E4M3}) {
    for (torch::ScalarType compute_dtype : {torch::kFloat, torch::kBFloat16}) {
      INFO("format " << static_cast<int>(format) << ", compute dtype " << compute_dtype);
      const EncodedTransfer host = encode(weights.clone(), format);
      const DType dtype = compute_dtype == torch::kFloat ? DType::kF32 : DType::kBF16;
      if (!torch::cuda::is_available()) {
        CHECK_THROWS_WITH(zo_perturb_transfer_cuda(host.copy(), nullptr, dtype, {}, nullptr),
                          Catch::Contains("built without CUDA"));
        continue;
      }
      const EncodedTransfer device = host.to(torch::Device(torch::kCUDA, 0));
      for (float scale : {0.0f, 1e-3f}) {
        INFO("scale " << scale);
        const ZoPerturb perturb{{11, 5}, scale};
        torch::Tensor expected = torch::empty({n}, compute_dtype);
        zo_perturb_transfer(host.copy(), expected.data_ptr(), dtype, perturb);
        torch::Tensor computed = torch::empty({n}, torch::TensorOptions(compute_dtype).device(torch::kCUDA));
        zo_perturb_transfer_cuda(device.copy(), computed.data_ptr(), dtype, perturb, nullptr);
        const torch::Tensor back = computed.to(torch::kCPU);
        if (scale == 0) {
          REQUIRE(torch::equal(back, expected));
        } else {
          // The CPU's and the GPU's logf/cosf differ in the last bit of some directions.
          const double tolerance = compute_dtype == torch::kFloat ? 1e-6 : 1e-2;
          REQUIRE(torch::allclose(back.to(torch::kFloat), expected.to(torch::kFloat), tolerance, 1e-7));
        }
      }
    }
  }
  ferry::testing::skip_without_cuda("the device comparison runs on the GPU machine");
}

TEST_CASE("the CUDA sum of squares is the CPU's up to order, repeatable, and flags Inf and NaN", "[optim][cuda]") {
  torch::manual_seed(5);
  const torch::Tensor values = torch::randn({5 * 1000 * 1000 + 13}) * 3;
  for (torch::ScalarType dtype : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
    INFO("dtype " << dtype);
    const torch::Tensor grad = values.to(dtype);
    const GradSpan host{grad.data_ptr(), grad.numel(), dtype == torch::kFloat      ? DType::kF32
                                                       : dtype == torch::kBFloat16 ? DType::kBF16
                                                                                   : DType::kF16};
    const GradStats expected = grad_stats(host);
    if (!torch::cuda::is_available()) {
      CHECK_THROWS_WITH(grad_stats_cuda(host, nullptr, nullptr), Catch::Contains("device doubles"));
      continue;
    }
    const torch::Device cuda(torch::kCUDA, 0);
    torch::Tensor on_device = grad.to(cuda);
    auto measure = [&] {
      torch::Tensor stats = torch::empty({kGradStatsCudaDoubles}, torch::TensorOptions(torch::kDouble).device(cuda));
      grad_stats_cuda({on_device.data_ptr(), host.size, host.dtype}, stats.data_ptr<double>(), nullptr);
      return stats.narrow(0, 0, 2).to(torch::kCPU);
    };
    const torch::Tensor first = measure();
    CHECK(first[0].item<double>() == Approx(expected.sum_squares).epsilon(1e-12));
    CHECK(first[1].item<double>() == 0.0);
    CHECK(torch::equal(first, measure()));
    on_device[4321] = std::numeric_limits<float>::infinity();
    CHECK(measure()[1].item<double>() == 1.0);
    on_device[4321] = std::numeric_limits<float>::quiet_NaN();
    CHECK(measure()[1].item<double>() == 1.0);
  }
  ferry::testing::skip_without_cuda("the device comparison runs on the GPU machine");
}

}  // namespace
}  // namespace ferry::optim
