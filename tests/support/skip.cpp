#include "support/skip.h"

#include <cstdio>
#include <cstdlib>

#include <torch/cuda.h>

#include "support/catch.h"

namespace ferry::testing {
namespace {

int g_skip_exit_code = 0;

}  // namespace

void set_skip_exit_code(int code) { g_skip_exit_code = code; }

bool skip(const std::string& reason) {
  if (g_skip_exit_code == 0) {
    WARN("skipped: " << reason);
    return true;
  }
  std::printf("skipped: %s\n", reason.c_str());
  std::fflush(stdout);
  // Not exit(): the test's own objects and Catch2's session are mid-flight, and static
  // destructors (LibTorch's among them) need not run for a process that reports one skip.
  std::_Exit(g_skip_exit_code);
}

bool skip_without_cuda(const std::string& reason) {
  return !torch::cuda::is_available() && skip("no CUDA device: " + reason);
}

}  // namespace ferry::testing
