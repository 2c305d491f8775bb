// Hardware figures: the calibration file `ferry bench calibrate` writes, and named machines.

#include <fstream>
#include <functional>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>

#include "ferry/check.h"
#include "ferry/io.h"
#include "ferry/plan.h"

namespace ferry {
namespace {

using Json = nlohmann::ordered_json;

constexpr std::uint64_t kGiB = std::uint64_t{1} << 30;

double number(const Json& root, const char* key, const std::string& file) {
  FERRY_CHECK(root.contains(key), file, ": missing field ", key);
  FERRY_CHECK(root.at(key).is_number() && root.at(key).get<double>() >= 0, file, ": field ", key,
              " must be a number >= 0, got ", root.at(key).dump());
  return root.at(key).get<double>();
}

// The mean of the known directories' figures stands in for a directory that has none.
double aggregate(const std::vector<NvmeFigures>& known, const std::vector<std::string>& directories,
                 double NvmeFigures::*figure) {
  if (known.empty()) return 0;
  double sum = 0;
  for (const NvmeFigures& entry : known) sum += entry.*figure;
  if (directories.empty()) return sum;
  const double mean = sum / static_cast<double>(known.size());
  double total = 0;
  for (const std::string& directory : directories) {
    double value = mean;
    for (const NvmeFigures& entry : known) {
      if (entry.directory == directory) value = entry.*figure;
    }
    total += value;
  }
  return total;
}

// Note: the presets are where a plan for hardware one does not have comes from. Each figure says
// where it was measured or which assumption it is; docs/plan.md repeats them.
Hardware h100() {
  Hardware hw;
  hw.name = "h100: ferry's GPU machine (H100 80GB HBM3, 16 Sapphire Rapids cores, virtio disk)";
  hw.gpu_memory_bytes = 80 * kGiB;
  // Measured there by `ferry bench calibrate` (2026-11-23, docs/benchmarks.md): device copies,
  // 8192^3 matmuls, pinned copies of 1 GiB.
  hw.gpu_memory_gbps = 2920;
  hw.matmul_tflops_bf16 = 745;
  hw.matmul_tflops_fp16 = 717;
  hw.matmul_tflops_fp32 = 51;
  hw.pcie_h2d_gbps = 55;
  hw.pcie_d2h_gbps = 55;
  hw.nvme = {{"/", 2.39, 3.85}};  // docs/benchmarks.md, bench io, io_uring depth 8, 1 MiB
  hw.cpu_adam_params_per_s = 4.3e9;  // docs/benchmarks.md: 1.35B parameters in 311 ms
  // Derived, docs/benchmarks.md: OPT-13B with write-back every 8th step against every 4th, 70 more
  // draws over 327M-parameter blocks, 37 ms more a step. tools/bench/zo_normals.cu measures it.
  hw.zo_normals_per_s = 6.2e11;
  hw.host_memory_bytes = 125 * kGiB;
  return hw;
}

Hardware h200() {
  Hardware hw;
  hw.name = "h200: ferry's GPU machine since 2026-12 (H200 141GB, 16 Sapphire Rapids cores, virtio disk)";
  // What the caching allocator reports as the device's capacity there (139.80 GiB).
  hw.gpu_memory_bytes = static_cast<std::uint64_t>(139.8 * static_cast<double>(kGiB));
  // Measured there by `ferry bench calibrate --nvme /tmp/nvme` (2026-12-03, docs/benchmarks.md,
  // "Placement by budget"): device copies, 8192^3 matmuls, pinned copies of 1 GiB, AdamW on 16
  // threads, zo2's kernel, the disk at the fastest queue depth and block size tried.
  hw.gpu_memory_gbps = 4157.6;
  hw.matmul_tflops_bf16 = 780.8;
  hw.matmul_tflops_fp16 = 745.6;
  hw.matmul_tflops_fp32 = 50.9;
  hw.pcie_h2d_gbps = 55.4;
  hw.pcie_d2h_gbps = 55.3;
  hw.nvme = {{"/", 2.34, 3.58, 8, std::uint64_t{4} << 20}};
  hw.cpu_adam_params_per_s = 5.09e9;
  hw.zo_normals_per_s = 2.4017e11;
  hw.host_memory_bytes = 125 * kGiB;
  return hw;
}

// The server of the Fuyou paper (Liao et al. 2024): one RTX 4090, 768 GB DDR4, 12 NVMe SSDs in
// RAID-0 on PCIe 4.0.
Hardware rtx4090_fuyou() {
  Hardware hw;
  hw.name = "rtx4090-fuyou: the Fuyou paper's server (RTX 4090 24 GB, 768 GB DDR4, 12 NVMe RAID-0)";
  hw.gpu_memory_bytes = 24 * kGiB;
  hw.gpu_memory_gbps = 900;       // ~90% of 1008 GB/s GDDR6X
  hw.matmul_tflops_bf16 = 165;    // the dense bf16 figure issue 9 gives (fp32 accumulate)
  hw.matmul_tflops_fp16 = 165;
  hw.matmul_tflops_fp32 = 82.6;
  hw.pcie_h2d_gbps = 25;          // assumed: PCIe 4.0 x16, pinned
  hw.pcie_d2h_gbps = 25;
  hw.nvme = {{"raid0", 30, 20}};  // assumed: 12 PCIe 4.0 SSDs behind one RAID-0 volume
  hw.cpu_adam_params_per_s = 3e9; // assumed: 8 channels of DDR4 at ~28 bytes per parameter
  hw.zo_normals_per_s = 7.6e11;   // assumed: the H100's figure scaled by fp32 throughput (82.6 / 67)
  hw.host_memory_bytes = 768 * std::uint64_t{1000000000};
  return hw;
}

// ZO2's measurements ran on one H100 80GB with the weights in host memory.
Hardware h100_zo2() {
  Hardware hw = h100();
  hw.name = "h100-zo2: ZO2's setting (one H100 80GB, block weights in host memory)";
  hw.pcie_h2d_gbps = 50;
  hw.pcie_d2h_gbps = 50;
  hw.nvme.clear();
  hw.host_memory_bytes = 1024 * kGiB;
  return hw;
}

const std::map<std::string, std::function<Hardware()>>& presets() {
  static const std::map<std::string, std::function<Hardware()>> table = {
      {"h100", h100}, {"h100-zo2", h100_zo2}, {"h200", h200}, {"rtx4090-fuyou", rtx4090_fuyou}};
  return table;
}

}  // namespace

double Hardware::matmul_tflops(Precision precision) const {
  switch (precision) {
    case Precision::kBF16: return matmul_tflops_bf16;
    case Precision::kF16: return matmul_tflops_fp16;
    case Precision::kF32: return matmul_tflops_fp32;
  }
  return matmul_tflops_fp32;
}

double Hardware::nvme_read_gbps(const std::vector<std::string>& directories) const {
  return aggregate(nvme, directories, &NvmeFigures::read_gbps);
}

NvmeIoSettings Hardware::nvme_io_for(const std::vector<std::string>& directories) const {
  if (directories.empty()) return {};
  for (const NvmeFigures& figures : nvme) {
    if (figures.directory == directories.front()) return {figures.queue_depth, figures.block_bytes};
  }
  return {};
}

double Hardware::nvme_write_gbps(const std::vector<std::string>& directories) const {
  return aggregate(nvme, directories, &NvmeFigures::write_gbps);
}

std::string Hardware::to_json() const {
  Json out;
  out["name"] = name;
  out["gpu_is_host"] = gpu_is_host;
  out["gpu_memory_bytes"] = gpu_memory_bytes;
  out["gpu_memory_gbps"] = gpu_memory_gbps;
  out["matmul_tflops_bf16"] = matmul_tflops_bf16;
  out["matmul_tflops_fp16"] = matmul_tflops_fp16;
  out["matmul_tflops_fp32"] = matmul_tflops_fp32;
  out["pcie_h2d_gbps"] = pcie_h2d_gbps;
  out["pcie_d2h_gbps"] = pcie_d2h_gbps;
  out["nvme"] = Json::array();
  for (const NvmeFigures& entry : nvme) {
    out["nvme"].push_back({{"directory", entry.directory},
                           {"read_gbps", entry.read_gbps},
                           {"write_gbps", entry.write_gbps},
                           {"queue_depth", entry.queue_depth},
                           {"block_bytes", entry.block_bytes}});
  }
  out["nvme_shared"] = nvme_shared;
  out["cpu_adam_params_per_s"] = cpu_adam_params_per_s;
  out["zo_normals_per_s"] = zo_normals_per_s;
  out["host_memory_bytes"] = host_memory_bytes;
  out["link_gbps"] = link_gbps;
  return out.dump(2) + "\n";
}

Hardware Hardware::from_json(const std::string& text, const std::string& file) {
  Json root = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  FERRY_CHECK(!root.is_discarded() && root.is_object(), file,
              ": not a JSON object (write one with `ferry bench calibrate --out FILE`)");
  Hardware hw;
  hw.name = root.contains("name") && root.at("name").is_string() ? root.at("name").get<std::string>() : file;
  if (root.contains("gpu_is_host")) {
    FERRY_CHECK(root.at("gpu_is_host").is_boolean(), file,
                ": field gpu_is_host must be true or false, got ", root.at("gpu_is_host").dump());
    hw.gpu_is_host = root.at("gpu_is_host").get<bool>();
  }
  hw.gpu_memory_bytes = static_cast<std::uint64_t>(number(root, "gpu_memory_bytes", file));
  hw.gpu_memory_gbps = number(root, "gpu_memory_gbps", file);
  hw.matmul_tflops_bf16 = number(root, "matmul_tflops_bf16", file);
  hw.matmul_tflops_fp16 = number(root, "matmul_tflops_fp16", file);
  hw.matmul_tflops_fp32 = number(root, "matmul_tflops_fp32", file);
  hw.pcie_h2d_gbps = number(root, "pcie_h2d_gbps", file);
  hw.pcie_d2h_gbps = number(root, "pcie_d2h_gbps", file);
  hw.cpu_adam_params_per_s = number(root, "cpu_adam_params_per_s", file);
  // Optional: files calibrated before zo2's kernels were timed lack it.
  if (root.contains("zo_normals_per_s")) hw.zo_normals_per_s = number(root, "zo_normals_per_s", file);
  hw.host_memory_bytes = static_cast<std::uint64_t>(number(root, "host_memory_bytes", file));
  // Optional: one machine's calibration does not measure it.
  if (root.contains("link_gbps")) hw.link_gbps = number(root, "link_gbps", file);
  if (root.contains("nvme_shared")) {
    FERRY_CHECK(root.at("nvme_shared").is_boolean(), file,
                ": field nvme_shared must be true or false, got ", root.at("nvme_shared").dump());
    hw.nvme_shared = root.at("nvme_shared").get<bool>();
  }
  if (root.contains("nvme")) {
    FERRY_CHECK(root.at("nvme").is_array(), file, ": field nvme must be an array");
    for (const Json& entry : root.at("nvme")) {
      FERRY_CHECK(entry.is_object() && entry.contains("directory") && entry.at("directory").is_string(),
                  file, ": every nvme entry needs a directory, got ", entry.dump());
      NvmeFigures figures{entry.at("directory").get<std::string>(), number(entry, "read_gbps", file),
                          number(entry, "write_gbps", file)};
      // Optional: files calibrated before the I/O settings were swept lack them.
      if (entry.contains("queue_depth")) figures.queue_depth = static_cast<unsigned>(number(entry, "queue_depth", file));
      if (entry.contains("block_bytes")) figures.block_bytes = static_cast<std::uint64_t>(number(entry, "block_bytes", file));
      hw.nvme.push_back(figures);
    }
  }
  return hw;
}

Hardware Hardware::load(const std::string& path) {
  std::ifstream stream(path);
  FERRY_CHECK(stream.good(), "cannot read the calibration file '", path,
              "': write one with `ferry bench calibrate --out ", path, "`");
  std::stringstream text;
  text << stream.rdbuf();
  return from_json(text.str(), path);
}

void Hardware::save(const std::string& path) const {
  write_file_durably(Env::posix(), path, to_json());
}

Precision preferred_precision(const Hardware& hardware) {
  return hardware.gpu_is_host ? Precision::kF32 : Precision::kBF16;
}

Hardware hardware_preset(const std::string& name) {
  auto found = presets().find(name);
  if (found == presets().end()) {
    std::string valid;
    for (const std::string& candidate : hardware_preset_names()) {
      valid += (valid.empty() ? "" : ", ") + candidate;
    }
    FERRY_CHECK(false, "unknown hardware preset '", name, "' (valid: ", valid,
                "; or measure this machine with `ferry bench calibrate`)");
  }
  return found->second();
}

std::vector<std::string> hardware_preset_names() {
  std::vector<std::string> names;
  for (const auto& entry : presets()) names.push_back(entry.first);
  return names;
}

}  // namespace ferry
