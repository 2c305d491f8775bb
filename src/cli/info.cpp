// `ferry info`: the version, the I/O backends (with why any was skipped and the fix) and the
// tiers this machine offers.

#include <cxxopts.hpp>
#include <iostream>

#include "cli/command.h"
#include "ferry/io.h"
#include "ferry/memory.h"
#include "ferry/system.h"
#include "ferry/version.h"

namespace ferry::cli {
namespace {

int run_info(int argc, char** argv) {
  cxxopts::Options options(argv[0], "Show ferry's version, I/O backends and tiers");
  options.add_options()
      ("nvme", "directories for the NVMe tier (comma-separated)",
       cxxopts::value<std::vector<std::string>>()->default_value("."))
      ("h,help", "show this help");
  auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    return 0;
  }

  std::cout << "ferry " << FERRY_VERSION_STRING << "\n\nI/O backends (probed in order):\n";
  bool chosen = false;
  for (const BackendProbe& probe : IoEngine::probe_all()) {
    const char* mark = probe.usable ? (chosen ? "available" : "selected") : "skipped";
    std::cout << "  " << to_string(probe.kind) << ": " << mark;
    if (!probe.usable) {
      std::cout << " — " << probe.reason << (probe.fix.empty() ? "" : "; fix: " + probe.fix);
    }
    std::cout << "\n";
    chosen = chosen || probe.usable;
  }

  GpuTierInfo gpu = probe_gpu_tier();
  std::cout << "\nTiers:\n  gpu:  " << gpu.description;
  if (gpu.cuda) {
    std::cout << ", " << format_bytes(gpu.total_bytes) << " (" << format_bytes(gpu.free_bytes)
              << " free)";
  }
  HostTierInfo host = probe_host_tier();
  std::cout << "\n  host: " << format_bytes(host.total_bytes) << " ("
            << format_bytes(host.available_bytes) << " available), " << host.cores
            << " cores [" << host.cpu_features << "], locked-memory limit " << host.memlock_limit
            << "\n";
  for (const std::string& directory : args["nvme"].as<std::vector<std::string>>()) {
    DiskTierInfo disk = probe_disk_tier(directory);
    std::cout << "  nvme: " << directory;
    if (!disk.exists) {
      std::cout << ": missing — create it or pass another directory with --nvme\n";
      continue;
    }
    std::cout << ": " << disk.filesystem << ", " << format_bytes(disk.free_bytes) << " free of "
              << format_bytes(disk.total_bytes) << ", "
              << (disk.direct_io ? "O_DIRECT" : "buffered I/O (O_DIRECT unsupported here)") << "\n";
  }
  return 0;
}

}  // namespace

FERRY_CLI_COMMAND("info", "version, I/O backends and the tiers this machine offers", run_info);

}  // namespace ferry::cli
