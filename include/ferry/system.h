#pragma once

// What the machine offers each tier, as ferry sees it at start-up.

#include <cstdint>
#include <string>
#include <vector>

namespace ferry {

struct GpuTierInfo {
  bool cuda = false;        // a CUDA device is usable
  std::string description;  // device name and memory, or why there is none
  uint64_t total_bytes = 0;
  uint64_t free_bytes = 0;
};

struct HostTierInfo {
  uint64_t total_bytes = 0;
  uint64_t available_bytes = 0;
  std::string memlock_limit;  // "unlimited" or a size
  unsigned cores = 0;
  std::string cpu_features;   // "avx512f avx512_bf16 amx ..." as far as ferry uses them
};

struct DiskTierInfo {
  std::string directory;
  bool exists = false;
  uint64_t free_bytes = 0;
  uint64_t total_bytes = 0;
  bool direct_io = false;
  std::string filesystem;
};

// The CUDA caching allocator's figures for the current device; zeros without CUDA.
struct GpuMemoryStats {
  uint64_t allocated_bytes = 0;
  uint64_t peak_allocated_bytes = 0;  // since the last reset_gpu_peak_memory()
  uint64_t reserved_bytes = 0;
};

GpuTierInfo probe_gpu_tier();
GpuMemoryStats gpu_memory_stats();
void reset_gpu_peak_memory();
// Returns the caching allocator's free blocks to the device, so that the next run starts from an
// empty cache, as a separate process would; nothing without CUDA.
void release_cached_gpu_memory();
// Waits for all work queued on the current device; nothing without CUDA.
void synchronize_gpu();
HostTierInfo probe_host_tier();
DiskTierInfo probe_disk_tier(const std::string& directory);

}  // namespace ferry
