#pragma once

// Hardware figures for the plan tests that run on the CPU: the bytes a plan counts do not depend
// on them, only its times do.

#include <cstdint>

#include "ferry/plan.h"

namespace ferry::testing {

inline Hardware cpu_figures() {
  Hardware hw;
  hw.name = "test CPU";
  hw.gpu_is_host = true;
  hw.gpu_memory_bytes = hw.host_memory_bytes = std::uint64_t{8} << 30;
  hw.gpu_memory_gbps = 10;
  hw.matmul_tflops_bf16 = hw.matmul_tflops_fp16 = hw.matmul_tflops_fp32 = 0.1;
  hw.pcie_h2d_gbps = hw.pcie_d2h_gbps = 5;
  hw.cpu_adam_params_per_s = 1e8;
  return hw;
}

}  // namespace ferry::testing
