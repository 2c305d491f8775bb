// Calibration: the hardware figures the cost model runs on, measured on this machine (the
// engine's own kernels and I/O engine, as the modes run them). Without a CUDA device the "GPU"
// tier is the CPU: its matmul and memory figures are the CPU's and "PCIe" is a host memcpy.

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include <torch/torch.h>

#include "ferry/check.h"
#include "ferry/memory.h"
#include "ferry/optim.h"
#include "ferry/plan.h"
#include "ferry/system.h"
#include "ferry/zo.h"
#include "plan/measure.h"

namespace ferry {
namespace {

double matmul_tflops(torch::Device device, torch::ScalarType dtype, std::int64_t n, int repeats) {
  const auto options = torch::TensorOptions().device(device).dtype(dtype);
  const torch::Tensor a = torch::randn({n, n}, options), b = torch::randn({n, n}, options);
  torch::Tensor c = torch::empty({n, n}, options);
  const double seconds = measure::median_seconds(repeats, [&] {
    torch::mm_out(c, a, b);
    synchronize_gpu();
  });
  return 2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n) / seconds / 1e12;
}

// GB/s of copying `bytes` from `from` to `to`; a device-to-device copy moves twice the bytes.
double copy_gbps(const torch::Tensor& from, torch::Tensor& to, int repeats, double traffic_per_byte) {
  const double seconds = measure::median_seconds(repeats, [&] {
    to.copy_(from, /*non_blocking=*/false);
    synchronize_gpu();
  });
  return traffic_per_byte * measure::gbps(static_cast<std::uint64_t>(from.nbytes()), seconds);
}

// The scratch file of a directory's measurement, removed on every way out of it.
class ScratchFile {
 public:
  explicit ScratchFile(std::string path) : path_(std::move(path)) {}
  ~ScratchFile() { ::unlink(path_.c_str()); }
  ScratchFile(const ScratchFile&) = delete;
  ScratchFile& operator=(const ScratchFile&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Through the I/O engine, for each of `settings` (queue depth, block size), keeping the one with
// the best harmonic mean of read and write, which a step of offloaded training does both of.
// Note: a directory without O_DIRECT (tmpfs, ramfs) is measured through the page cache, as the
// store then runs it; a directory with less room than `file_bytes` is measured with what fits
// (half its free space, at least 1 MiB), so that calibrating never fills a disk.
NvmeFigures measure_directory(const std::string& directory, std::uint64_t file_bytes, unsigned repeat,
                              const std::vector<IoOptions>& settings,
                              const std::function<void(const std::string&)>& say) {
  const DiskTierInfo disk = probe_disk_tier(directory);
  FERRY_CHECK(disk.exists, "NVMe directory '", directory, "' does not exist: give a writable directory on the SSD ",
              "(mkdir -p ", directory, ")");
  if (!disk.direct_io) {
    say("NVMe " + directory + ": no O_DIRECT on its filesystem (" + disk.filesystem +
        "): measured, and run by the store, through the page cache (buffered)");
  }
  constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;
  if (disk.total_bytes > 0 && disk.free_bytes / 2 < file_bytes) {
    const std::uint64_t fitting = disk.free_bytes / 2 / kMiB * kMiB;
    FERRY_CHECK(fitting >= kMiB, "NVMe directory '", directory, "' has ", format_bytes(disk.free_bytes),
                " free: too little to measure it (2 MiB at least) or to hold a job's data; free space there");
    say(detail::concat("NVMe ", directory, ": ", format_bytes(disk.free_bytes), " free, measured with ",
                       format_bytes(fitting), " instead of ", format_bytes(file_bytes)));
    file_bytes = fitting;
  }
  const std::size_t buffer_bytes = static_cast<std::size_t>(std::min<std::uint64_t>(file_bytes, std::uint64_t{256} << 20));
  HostArena arena({.budget_bytes = buffer_bytes, .chunk_bytes = std::min(buffer_bytes, std::size_t{1} << 30),
                   .name = "calibrate"});
  HostBlock buffer = arena.allocate(buffer_bytes);
  std::memset(buffer.data(), 0x5a, buffer.bytes());
  const ScratchFile scratch(directory + "/ferry-calibrate-" + std::to_string(::getpid()) + ".dat");
  NvmeFigures best{directory, 0, 0};
  auto harmonic = [](const NvmeFigures& f) { return f.read_gbps > 0 && f.write_gbps > 0 ? 2 / (1 / f.read_gbps + 1 / f.write_gbps) : 0; };
  auto file = StripedFile::open(Env::posix(), scratch.path(), OpenMode::kCreate);
  file->members()[0]->allocate(file_bytes);
  for (const IoOptions& io : settings) {
    auto engine = IoEngine::create(io);
    engine->register_buffer(buffer.data(), buffer.bytes());
    auto measure = [&](IoOp op) {
      return measure::median_of(repeat, [&] { return measure::engine_gbps(*engine, *file, op, buffer.as<char>(), buffer_bytes, file_bytes); });
    };
    NvmeFigures figures{directory, 0, 0, io.queue_depth, io.block_bytes};
    figures.write_gbps = measure(IoOp::kWrite);
    figures.read_gbps = measure(IoOp::kRead);
    engine->unregister_buffer(buffer.data());
    if (harmonic(figures) > harmonic(best)) best = figures;
  }
  return best;
}

double cpu_adam_params_per_s(std::int64_t elements, int repeats) {
  std::vector<float> master(static_cast<std::size_t>(elements), 0.5f), m(master.size()), v(master.size()),
      grad(master.size(), 1e-3f);
  optim::AdamWParams params;
  optim::StepContext context;
  context.grad_checked_finite = true;
  const optim::GradSpan g = optim::GradSpan::f32(grad.data(), elements);
  const double seconds = measure::median_seconds(repeats, [&] {
    optim::adamw_step(params, context, {master.data(), elements}, {m.data(), elements}, {v.data(), elements}, g, {});
    ++context.step;
  });
  return static_cast<double>(elements) / seconds;
}

// One zo2 kernel as a streamed block's visit runs it: an update applied, then a perturbed copy,
// two draws of z per bf16 weight. Bound by the draws (Philox, Box-Muller), not by memory.
double zo_normals_per_s(torch::Device device, std::int64_t elements, int repeats) {
  const auto options = torch::TensorOptions().device(device).dtype(torch::kBFloat16);
  torch::Tensor weights = torch::zeros({elements}, options);
  torch::Tensor compute = torch::empty({elements}, options);
  optim::ZoTensors tensors;
  tensors.weights = weights.data_ptr();
  tensors.weights_dtype = optim::DType::kBF16;
  tensors.compute = compute.data_ptr();
  tensors.compute_dtype = optim::DType::kBF16;
  tensors.numel = elements;
  const optim::ZoUpdate update = optim::zo_sgd_update(1e-6f, 1, 1.0f);
  const optim::ZoPerturb perturb{{2, 0}, 1e-3f};
  const double seconds = measure::median_seconds(repeats, [&] {
    if (device.is_cuda()) {
      optim::zo_apply_cuda(tensors, &update, 1, perturb, nullptr);
    } else {
      optim::zo_apply(tensors, &update, 1, perturb);
    }
    synchronize_gpu();
  });
  return 2.0 * static_cast<double>(elements) / seconds;
}

std::string fixed(double value, int digits = 1) {
  char text[32];
  std::snprintf(text, sizeof text, "%.*f", digits, value);
  return text;
}

}  // namespace

Hardware calibrate(const CalibrationOptions& options, const std::function<void(const std::string&)>& report) {
  const unsigned repeat = std::max(1u, options.repeat);
  const int repeats = static_cast<int>(repeat);
  auto say = [&](const std::string& line) {
    if (report) report(line);
  };
  const GpuTierInfo gpu = probe_gpu_tier();
  const HostTierInfo host = probe_host_tier();
  const torch::Device device = gpu.cuda ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);

  Hardware hw;
  hw.gpu_is_host = !gpu.cuda;
  hw.name = gpu.cuda ? gpu.description : "this machine's CPU";  // gpu_is_host says the rest
  hw.gpu_memory_bytes = gpu.cuda ? gpu.total_bytes : host.total_bytes;
  hw.host_memory_bytes = host.total_bytes;
  say("calibrate: " + hw.name + (hw.gpu_is_host ? " (no CUDA device: the GPU tier is host memory)" : ""));

  const std::int64_t n = options.quick ? (gpu.cuda ? 2048 : 512) : (gpu.cuda ? 8192 : 1024);
  hw.matmul_tflops_fp32 = matmul_tflops(device, torch::kFloat, n, repeats);
  hw.matmul_tflops_bf16 = matmul_tflops(device, torch::kBFloat16, n, repeats);
  hw.matmul_tflops_fp16 = gpu.cuda ? matmul_tflops(device, torch::kHalf, n, repeats) : hw.matmul_tflops_bf16;
  say(detail::concat("matmul ", n, "x", n, ": fp32 ", fixed(hw.matmul_tflops_fp32), ", bf16 ",
                     fixed(hw.matmul_tflops_bf16), ", fp16 ", fixed(hw.matmul_tflops_fp16), " TFLOPS"));

  // 1 GiB / 256 MiB of fp32; quick: 32 MiB.
  const std::int64_t copy_elements = std::int64_t{1} << (options.quick ? 23 : gpu.cuda ? 28 : 26);
  {
    const torch::Tensor a = torch::ones({copy_elements}, torch::TensorOptions().device(device));
    torch::Tensor b = torch::empty_like(a);
    hw.gpu_memory_gbps = copy_gbps(a, b, repeats, 2.0);
  }
  {
    const auto host_options = torch::TensorOptions().pinned_memory(gpu.cuda);
    const torch::Tensor pinned = torch::ones({copy_elements}, host_options);
    torch::Tensor on_device = torch::empty({copy_elements}, torch::TensorOptions().device(device));
    torch::Tensor back = torch::empty({copy_elements}, host_options);
    hw.pcie_h2d_gbps = copy_gbps(pinned, on_device, repeats, 1.0);
    hw.pcie_d2h_gbps = copy_gbps(on_device, back, repeats, 1.0);
  }
  say(detail::concat(gpu.cuda ? "GPU" : "host", " memory ", fixed(hw.gpu_memory_gbps), " GB/s; ",
                     gpu.cuda ? "PCIe (pinned) " : "host memcpy (no PCIe) ", fixed(hw.pcie_h2d_gbps),
                     " GB/s up, ", fixed(hw.pcie_d2h_gbps), " GB/s down"));

  hw.cpu_adam_params_per_s = cpu_adam_params_per_s(std::int64_t{1} << (options.quick ? 22 : 25), repeats);
  say(detail::concat("CPU AdamW (", optim::num_threads(), " threads, ", optim::isa_name(optim::active_isa()),
                     "): ", fixed(hw.cpu_adam_params_per_s / 1e9, 2), "e9 parameters/s"));

  const int zo_log2 = gpu.cuda ? (options.quick ? 24 : 28) : (options.quick ? 18 : 22);
  hw.zo_normals_per_s = zo_normals_per_s(device, std::int64_t{1} << zo_log2, repeats);
  say(detail::concat("zo2 kernel: ", fixed(hw.zo_normals_per_s / 1e9, 2), "e9 normals/s"));

  const std::uint64_t file_bytes = std::max<std::uint64_t>(options.nvme_bytes >> 20 << 20, 1 << 20);
  for (const std::string& directory : options.nvme_directories) {
    // Quick: the engine's defaults only; otherwise the depths and block sizes `ferry bench io`
    // found to matter on the GPU machine's disk (docs/benchmarks.md).
    std::vector<IoOptions> settings{IoOptions{}};
    if (!options.quick) {
      settings.clear();
      for (unsigned depth : {8u, 16u, 32u}) {
        for (std::size_t block : {std::size_t{1} << 20, std::size_t{4} << 20}) {
          IoOptions io;
          io.queue_depth = depth;
          io.block_bytes = block;
          settings.push_back(io);
        }
      }
    }
    hw.nvme.push_back(measure_directory(directory, file_bytes, repeat, settings, say));
    const NvmeFigures& figures = hw.nvme.back();
    say(detail::concat("NVMe ", directory, ": read ", fixed(figures.read_gbps, 2), " GB/s, write ",
                       fixed(figures.write_gbps, 2), " GB/s (queue depth ", figures.queue_depth, ", ",
                       format_bytes(figures.block_bytes), " blocks)"));
  }
  return hw;
}

}  // namespace ferry
