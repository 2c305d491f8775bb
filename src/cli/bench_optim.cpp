// `ferry bench optim`: ferry's CPU AdamW against LibTorch's CPU AdamW and against the memory
// bandwidth of this machine, measured in the same run on the same spans. docs/optim.md says
// how each figure is computed.

#include <ATen/Parallel.h>
#include <torch/optim/adamw.h>
#include <torch/types.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cxxopts.hpp>
#include <functional>
#include <iostream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "cli/command.h"
#include "plan/measure.h"
#include "ferry/check.h"
#include "ferry/job.h"
#include "ferry/optim.h"

// LibTorch has a fused CPU AdamW kernel from 2.4 on.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
#define FERRY_BENCH_TORCH_FUSED_ADAMW 1
#else
#define FERRY_BENCH_TORCH_FUSED_ADAMW 0
#endif

namespace ferry::cli {
namespace {

// Bytes an in-place AdamW step moves per parameter: read p, m, v and the gradient, write p,
// m, v. With a bf16 gradient and a bf16 copy of p the total is the same: 2 bytes less read,
// 2 more written.
constexpr double kAdamWBytes = 28.0;
// The finiteness pre-scan reads an fp32 gradient once more.
constexpr double kAdamWWithScanBytes = 32.0;

// The bound: a loop with the optimizer's access pattern and almost none of its arithmetic,
// p[i] += s * g[i], m[i] += s * g[i], v[i] += s * g[i], on as many threads. It moves the same
// 28 bytes per element (4 streams read, 3 written back in place) and tells what the memory
// system delivers to that pattern. Like STREAM it reports the fastest run.
//
// Note: in place matters. STREAM's triad (a = b + s * c) writes lines it never read, which
// costs write-allocate reads it does not count, and one or two streams per core reach less
// bandwidth than seven do on many CPUs; either would make the bound too easy.
double bandwidth_bytes_per_second(float* p, float* m, float* v, const float* g,
                                  std::int64_t size, int threads, int repeats) {
  auto pass = [&] {
    std::vector<std::thread> workers;
    const std::int64_t chunk = (size + threads - 1) / threads;
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([=] {
        const std::int64_t begin = std::min(size, t * chunk);
        const std::int64_t end = std::min(size, begin + chunk);
        for (std::int64_t i = begin; i < end; ++i) {
          const float step = 1e-7f * g[i];
          p[i] += step;
          m[i] += step;
          v[i] += step;
        }
      });
    }
    for (std::thread& worker : workers) worker.join();
  };
  return kAdamWBytes * static_cast<double>(size) / measure::sorted_seconds(repeats, pass).front();
}

struct Row {
  std::string name;
  double params_per_second;
  std::optional<double> bytes_per_param;  // set for ferry's rows, which have a bandwidth bound
};

void print_row(const Row& row, double torch_per_second, std::optional<double> fused_per_second,
               double bandwidth) {
  std::printf("| %-48s | %9.3g | %8.2fx |", row.name.c_str(), row.params_per_second,
              row.params_per_second / torch_per_second);
  if (fused_per_second) {
    std::printf(" %8.2fx |", row.params_per_second / *fused_per_second);
  } else {
    std::printf(" %9s |", "n/a");
  }
  if (row.bytes_per_param) {
    const double bound = bandwidth / *row.bytes_per_param;
    std::printf(" %4.0f B | %7.1f%% |\n", *row.bytes_per_param,
                100.0 * row.params_per_second / bound);
  } else {
    std::printf(" %6s | %8s |\n", "", "");
  }
}

int run_bench_optim(int argc, char** argv) {
  cxxopts::Options options(argv[0],
                           "Measure ferry's CPU AdamW against LibTorch's and the memory bandwidth");
  options.add_options()
      ("elements", "parameters per span, 1 or more", cxxopts::value<std::string>()->default_value("268435456"))
      ("threads", "threads for ferry, LibTorch and the bandwidth loop, 0 or more (0: one per core)",
       cxxopts::value<std::string>()->default_value("0"))
      ("repeats", "timed steps per figure, 1 or more (the median is reported)",
       cxxopts::value<std::string>()->default_value("5"))
      ("isa", "ferry's kernels: scalar, avx2 or avx512 (default: the best this CPU has)",
       cxxopts::value<std::string>())
      ("h,help", "show this help");
  auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    return 0;
  }
  const std::int64_t elements = parse_integer(args["elements"].as<std::string>(), "--elements", 1, std::int64_t{1} << 40);
  const auto repeats = static_cast<int>(parse_integer(args["repeats"].as<std::string>(), "--repeats", 1, 1000));
  if (args.count("isa")) optim::set_isa(optim::parse_isa(args["isa"].as<std::string>()));
  optim::set_num_threads(static_cast<int>(parse_integer(args["threads"].as<std::string>(), "--threads", 0, 4096)));
  const int threads = optim::num_threads();
  at::set_num_threads(threads);

  std::printf("bench optim: %lld parameters (%.2f GiB per fp32 span), %d threads, ferry isa %s, "
              "LibTorch %s\n",
              static_cast<long long>(elements), 4.0 * static_cast<double>(elements) / (1 << 30),
              threads, optim::isa_name(optim::active_isa()), TORCH_VERSION);

  torch::NoGradGuard no_grad;
  const torch::Tensor param = torch::rand({elements}) * 2 - 1;
  const torch::Tensor grad = torch::rand({elements}) * 2e-2f - 1e-2f;
  param.mutable_grad() = grad;
  const torch::Tensor exp_avg = torch::zeros_like(param);
  const torch::Tensor exp_avg_sq = torch::zeros_like(param);

  const double bandwidth = bandwidth_bytes_per_second(
      param.data_ptr<float>(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(),
      grad.data_ptr<float>(), elements, threads, repeats);
  exp_avg.zero_();
  exp_avg_sq.zero_();
  std::printf("memory bandwidth: %.1f GB/s (p, m, v += s * g in place: %.0f B per element, "
              "%d threads)\n\n",
              bandwidth / 1e9, kAdamWBytes, threads);

  const torch::optim::AdamWOptions adamw_options(1e-3);
  auto per_second = [&](double seconds) { return static_cast<double>(elements) / seconds; };

  torch::optim::AdamW torch_adamw({param}, adamw_options);
  const double torch_per_second = per_second(measure::median_seconds(repeats, [&] { torch_adamw.step(); }));
  torch_adamw.state().clear();

  std::optional<double> fused_per_second;
#if FERRY_BENCH_TORCH_FUSED_ADAMW
  {
    const torch::Tensor step = torch::zeros({}, torch::kFloat);
    fused_per_second = per_second(measure::median_seconds(repeats, [&] {
      step.add_(1);
      at::_fused_adamw_({param}, {grad}, {exp_avg}, {exp_avg_sq}, {}, {step}, adamw_options.lr(),
                        std::get<0>(adamw_options.betas()), std::get<1>(adamw_options.betas()),
                        adamw_options.weight_decay(), adamw_options.eps(), false, false);
    }));
    exp_avg.zero_();
    exp_avg_sq.zero_();
  }
#endif

  const torch::Tensor grad_bf16 = grad.to(torch::kBFloat16);
  const torch::Tensor param_bf16 = torch::empty({elements}, torch::kBFloat16);
  const optim::FloatSpan master{param.data_ptr<float>(), elements};
  const optim::FloatSpan m{exp_avg.data_ptr<float>(), elements};
  const optim::FloatSpan v{exp_avg_sq.data_ptr<float>(), elements};
  optim::AdamWParams params;
  params.lr = adamw_options.lr();
  params.weight_decay = adamw_options.weight_decay();
  optim::StepContext context;
  auto ferry_per_second = [&](const optim::GradSpan& g, const optim::OutputSpan& out,
                              bool checked) {
    context.grad_checked_finite = checked;
    return per_second(measure::median_seconds(repeats, [&] {
      const optim::StepReport report = optim::adamw_step(params, context, master, m, v, g, out);
      FERRY_ASSERT(!report.skipped, "the benchmark's gradient is finite");
      ++context.step;
    }));
  };
  const optim::GradSpan g32 = optim::GradSpan::f32(grad.data_ptr<float>(), elements);
  const optim::GradSpan g16 = optim::GradSpan::bf16(
      static_cast<const std::uint16_t*>(grad_bf16.data_ptr()), elements);
  const optim::OutputSpan out16{static_cast<std::uint16_t*>(param_bf16.data_ptr()), elements,
                                optim::DType::kBF16};

  std::vector<Row> rows;
  rows.push_back({"torch::optim::AdamW (C++ API)", torch_per_second, std::nullopt});
  if (fused_per_second) {
    rows.push_back({"torch fused AdamW (at::_fused_adamw_)", *fused_per_second, std::nullopt});
  }
  rows.push_back({"ferry AdamW, fp32 grad (pre-checked)", ferry_per_second(g32, {}, true),
                  kAdamWBytes});
  rows.push_back({"ferry AdamW, fp32 grad + finiteness scan", ferry_per_second(g32, {}, false),
                  kAdamWWithScanBytes});
  rows.push_back({"ferry AdamW, bf16 grad + bf16 copy (pre-checked)",
                  ferry_per_second(g16, out16, true), kAdamWBytes});

  std::printf("| %-48s | %9s | %9s | %9s | %6s | %8s |\n", "optimizer", "params/s",
              "vs torch", "vs fused", "bytes", "of bound");
  std::printf("|%s|%s|%s|%s|%s|%s|\n", std::string(50, '-').c_str(), std::string(11, '-').c_str(),
              std::string(11, '-').c_str(), std::string(11, '-').c_str(),
              std::string(8, '-').c_str(), std::string(10, '-').c_str());
  for (const Row& row : rows) print_row(row, torch_per_second, fused_per_second, bandwidth);
  if (!fused_per_second) {
    std::printf("\nLibTorch %s has no fused CPU AdamW (it came in 2.4): 'vs fused' is n/a.\n",
                TORCH_VERSION);
  }
  std::printf(
      "torch::optim::AdamW runs one tensor op per term; on one tensor that is the same kernel\n"
      "sequence as torch.optim.AdamW(foreach=True). 'of bound' = params/s / (bandwidth / bytes).\n");
  return 0;
}

FERRY_CLI_COMMAND("bench optim", "measure the CPU optimizer against LibTorch's and memory bandwidth",
                  run_bench_optim);

}  // namespace
}  // namespace ferry::cli
