// The CUDA Adam/AdamW step against the CPU kernels: the same bits, for every gradient dtype and
// low-precision copy, with weight decay, clipping and a loss scale. Runs on the GPU machine;
// without CUDA it checks the refusal.

#include <optional>

#include <torch/cuda.h>
#include <torch/types.h>

#include "ferry/optim.h"
#include "support/catch.h"

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
    WARN("no CUDA device: the device comparison runs on the GPU machine");
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

}  // namespace
}  // namespace ferry::optim
