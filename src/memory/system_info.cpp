#include <sys/resource.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <fstream>
#include <sstream>

#include "ferry/io.h"
#include "ferry/memory.h"
#include "ferry/system.h"
#include "ferry/fs.h"

#if FERRY_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>
#endif

namespace ferry {
namespace {

uint64_t meminfo_bytes(const std::string& key) {
  std::ifstream in("/proc/meminfo");
  std::string name;
  uint64_t kib = 0;
  std::string unit;
  while (in >> name >> kib >> unit) {
    if (name == key + ":") return kib * 1024;
  }
  return 0;
}

std::string filesystem_name(long magic) {
  switch (magic) {
    case 0xEF53: return "ext4";
    case 0x58465342: return "xfs";
    case 0x9123683E: return "btrfs";
    case 0x01021994: return "tmpfs";
    case 0x794C7630: return "overlayfs";
    case 0x6969: return "nfs";
    case 0x2FC12FC1: return "zfs";
    case 0xF2F52010: return "f2fs";
    default: {
      std::ostringstream out;
      out << "magic 0x" << std::hex << magic;
      return out.str();
    }
  }
}

}  // namespace

GpuTierInfo probe_gpu_tier() {
  GpuTierInfo info;
#if FERRY_WITH_CUDA
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    info.description = std::string("no usable CUDA device (") +
                       (status != cudaSuccess ? cudaGetErrorString(status) : "none found") + ")";
    return info;
  }
  cudaDeviceProp properties{};
  cudaGetDeviceProperties(&properties, 0);
  size_t free_bytes = 0, total_bytes = 0;
  cudaMemGetInfo(&free_bytes, &total_bytes);
  info.cuda = true;
  info.total_bytes = total_bytes;
  info.free_bytes = free_bytes;
  info.description = std::string(properties.name) + ", compute capability " +
                     std::to_string(properties.major) + "." + std::to_string(properties.minor);
#else
  info.description =
      "this build has no CUDA (LibTorch without CUDA): the GPU tier is ordinary host memory "
      "under its own budget";
#endif
  return info;
}

GpuMemoryStats gpu_memory_stats() {
  GpuMemoryStats stats;
#if FERRY_WITH_CUDA
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return stats;
  constexpr size_t all = 0;  // StatType::AGGREGATE: every pool
  try {
    auto device_stats =
        c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    stats.allocated_bytes = static_cast<uint64_t>(device_stats.allocated_bytes[all].current);
    stats.peak_allocated_bytes = static_cast<uint64_t>(device_stats.allocated_bytes[all].peak);
    stats.reserved_bytes = static_cast<uint64_t>(device_stats.reserved_bytes[all].current);
  } catch (const c10::Error&) {
    // The caching allocator starts with the first CUDA allocation: nothing allocated yet.
  }
#endif
  return stats;
}

void reset_gpu_peak_memory() {
#if FERRY_WITH_CUDA
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return;
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
  } catch (const c10::Error&) {
    // Not started yet (nothing allocated): there is no peak to reset.
  }
#endif
}

void release_cached_gpu_memory() {
#if FERRY_WITH_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) == cudaSuccess && count > 0) c10::cuda::CUDACachingAllocator::emptyCache();
#endif
}

void synchronize_gpu() {
#if FERRY_WITH_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) == cudaSuccess && count > 0) cudaDeviceSynchronize();
#endif
}

HostTierInfo probe_host_tier() {
  HostTierInfo info;
  info.total_bytes = meminfo_bytes("MemTotal");
  info.available_bytes = meminfo_bytes("MemAvailable");
  rlimit limit{};
  info.memlock_limit = getrlimit(RLIMIT_MEMLOCK, &limit) != 0 ? "unknown"
                       : limit.rlim_cur == RLIM_INFINITY  ? "unlimited"
                                                          : format_bytes(limit.rlim_cur);
  info.cores = static_cast<unsigned>(sysconf(_SC_NPROCESSORS_ONLN));
  __builtin_cpu_init();
  for (const auto& [feature, present] :
       {std::pair{"avx2", __builtin_cpu_supports("avx2")},
        std::pair{"f16c", __builtin_cpu_supports("f16c")},
        std::pair{"avx512f", __builtin_cpu_supports("avx512f")},
        std::pair{"avx512bw", __builtin_cpu_supports("avx512bw")},
        std::pair{"avx512bf16", __builtin_cpu_supports("avx512bf16")}}) {
    if (present) info.cpu_features += (info.cpu_features.empty() ? "" : " ") + std::string(feature);
  }
  return info;
}

DiskTierInfo probe_disk_tier(const std::string& directory) {
  DiskTierInfo info;
  info.directory = directory;
  info.exists = fs::is_directory(directory);
  if (!info.exists) return info;
  struct statvfs vfs{};
  if (statvfs(directory.c_str(), &vfs) == 0) {
    info.free_bytes = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
    info.total_bytes = static_cast<uint64_t>(vfs.f_blocks) * vfs.f_frsize;
  }
  struct statfs fs{};
  if (statfs(directory.c_str(), &fs) == 0) info.filesystem = filesystem_name(fs.f_type);
  info.direct_io = supports_direct_io(directory);
  return info;
}

}  // namespace ferry
