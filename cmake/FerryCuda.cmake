# Decides FERRY_WITH_CUDA from the LibTorch found: CUDA code is built only against a CUDA torch.
set(FERRY_WITH_CUDA OFF)
if(TARGET c10_cuda OR TARGET torch_cuda OR TORCH_CUDA_LIBRARIES)
  find_package(CUDAToolkit REQUIRED)
  set(FERRY_WITH_CUDA ON)
endif()
message(STATUS "ferry: CUDA ${FERRY_WITH_CUDA} (Torch ${Torch_VERSION})")
