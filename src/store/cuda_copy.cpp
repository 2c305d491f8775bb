// The CUDA half of device_copy.h; compiled only when the LibTorch found has CUDA.
#if FERRY_WITH_CUDA

#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "ferry/check.h"
#include "store/device_copy.h"

namespace ferry::detail {
namespace {

class CudaEvent final : public DeviceEvent {
 public:
  CudaEvent(c10::DeviceIndex device, const c10::cuda::CUDAStream& stream) : device_(device) {
    event_.record(stream);
  }
  void block(const c10::cuda::CUDAStream& stream) { event_.block(stream); }
  void block_current_stream() override { event_.block(c10::cuda::getCurrentCUDAStream(device_)); }

 private:
  c10::DeviceIndex device_;
  at::cuda::CUDAEvent event_;
};

void CUDART_CB run_done(void* data) {
  std::unique_ptr<std::function<void()>> done(static_cast<std::function<void()>*>(data));
  (*done)();
}

// Note: one copy stream per direction, so uploads never queue behind downloads. Each copy first
// makes its stream wait for the work that was queued on the requesting thread's current
// (compute) stream when the transfer was asked for: a copy into a GPU copy must not overwrite
// memory that kernels still read (or that the caching allocator just recycled from them), and a
// copy out of one must see what they wrote. The store learns of completion from a host function
// queued behind the copy (cudaLaunchHostFunc), so no thread of its own watches events.
class CudaCopier final : public DeviceCopier {
 public:
  explicit CudaCopier(torch::Device device)
      : device_(torch::kCUDA, device.has_index() ? device.index() : c10::cuda::current_device()),
        to_device_(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device_.index())),
        to_host_(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device_.index())) {}

  ~CudaCopier() override {
    to_device_.synchronize();
    to_host_.synchronize();
  }

  torch::Device device() const override { return device_; }

  std::shared_ptr<DeviceEvent> record_current_stream() override {
    c10::cuda::CUDAGuard device_guard(device_.index());
    return std::make_shared<CudaEvent>(device_.index(),
                                       c10::cuda::getCurrentCUDAStream(device_.index()));
  }

  std::shared_ptr<DeviceEvent> copy(torch::Tensor destination, const torch::Tensor& source,
                                    DeviceEvent* after,
                                    std::function<void()> done) override {
    FERRY_ASSERT(after != nullptr, "a CUDA copy needs the requesting stream's event");
    c10::cuda::CUDAGuard device_guard(device_.index());
    c10::cuda::CUDAStream stream = destination.is_cuda() ? to_device_ : to_host_;
    static_cast<CudaEvent*>(after)->block(stream);
    {
      c10::cuda::CUDAStreamGuard stream_guard(stream);
      destination.copy_(source, /*non_blocking=*/true);
    }
    auto copied = std::make_shared<CudaEvent>(device_.index(), stream);
    auto pending = std::make_unique<std::function<void()>>(std::move(done));
    C10_CUDA_CHECK(cudaLaunchHostFunc(stream.stream(), &run_done, pending.get()));
    pending.release();
    return copied;
  }

 private:
  torch::Device device_;
  c10::cuda::CUDAStream to_device_;
  c10::cuda::CUDAStream to_host_;
};

}  // namespace

std::unique_ptr<DeviceCopier> make_cuda_copier(torch::Device device) {
  return std::make_unique<CudaCopier>(device);
}

}  // namespace ferry::detail

#endif  // FERRY_WITH_CUDA
