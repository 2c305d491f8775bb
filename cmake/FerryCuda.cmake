# Decides FERRY_WITH_CUDA from the LibTorch found: CUDA code is built only against a CUDA torch.
set(FERRY_WITH_CUDA OFF)
if(TARGET c10_cuda OR TARGET torch_cuda OR TORCH_CUDA_LIBRARIES)
  find_package(CUDAToolkit REQUIRED)
  set(FERRY_WITH_CUDA ON)
  # The kernels in src/*/*.cu: Ampere and Hopper unless the caller chooses.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 80 90)
  endif()
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  enable_language(CUDA)
endif()
message(STATUS "ferry: CUDA ${FERRY_WITH_CUDA} (Torch ${Torch_VERSION})")
