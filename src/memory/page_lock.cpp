#include "memory/page_lock.h"

#include <sys/mman.h>
#include <sys/resource.h>

#include <cerrno>
#include <cstring>

#include "ferry/check.h"

#if FERRY_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace ferry::detail {
namespace {

#if FERRY_WITH_CUDA
bool cuda_device_present() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}
#endif

std::string memlock_limit() {
  rlimit limit{};
  if (getrlimit(RLIMIT_MEMLOCK, &limit) != 0) return "unknown";
  return limit.rlim_cur == RLIM_INFINITY ? "unlimited" : std::to_string(limit.rlim_cur) + " bytes";
}

}  // namespace

std::string lock_pages(void* base, size_t bytes) {
#if FERRY_WITH_CUDA
  if (cuda_device_present()) {
    cudaError_t status = cudaHostRegister(base, bytes, cudaHostRegisterDefault);
    FERRY_CHECK(status == cudaSuccess, "cudaHostRegister of ", bytes,
                " bytes failed: ", cudaGetErrorString(status),
                "; lower the host budget or raise the locked-memory limit (ulimit -l)");
    return "cudaHostRegister";
  }
#endif
  if (mlock(base, bytes) == 0) return "mlock";
  return std::string("not locked: mlock failed (") + std::strerror(errno) + ", RLIMIT_MEMLOCK " +
         memlock_limit() + "); raise it with `ulimit -l unlimited`";
}

void unlock_pages(void* base, size_t bytes, const std::string& how) {
#if FERRY_WITH_CUDA
  if (how == "cudaHostRegister") {
    cudaHostUnregister(base);
    return;
  }
#endif
  if (how == "mlock") munlock(base, bytes);
}

}  // namespace ferry::detail
