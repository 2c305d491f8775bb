// The CUDA half of device_copy.h; compiled only when the LibTorch found has CUDA.
#if FERRY_WITH_CUDA

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

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

// Runs the `done` callbacks of finished copies, in order, on a thread of its own.
class CompletionThread {
 public:
  CompletionThread() : thread_([this] { run(); }) {}
  ~CompletionThread() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    posted_.notify_one();
    thread_.join();
  }

  void post(std::function<void()> done) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(std::move(done));
    }
    posted_.notify_one();
  }

 private:
  void run() {
    for (;;) {
      std::function<void()> done;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        posted_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        done = std::move(queue_.front());
        queue_.pop_front();
      }
      done();
    }
  }

  std::mutex mutex_;
  std::condition_variable posted_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false;
  std::thread thread_;
};

struct PendingCopy {
  CompletionThread* completions;
  std::function<void()> done;
};

void CUDART_CB post_done(void* data) {
  std::unique_ptr<PendingCopy> pending(static_cast<PendingCopy*>(data));
  pending->completions->post(std::move(pending->done));
}

// Note: one copy stream per direction, so uploads never queue behind downloads. A copy first
// makes its stream wait for the work that was queued on the requesting thread's current
// (compute) stream when the transfer was asked for: a copy into an existing GPU copy must not
// overwrite memory that kernels still read, and a copy out of one must see what they wrote.
// An upload into fresh memory waits for nothing: GPU copies are allocated from the upload
// stream's pool and retired with record_stream on the stream that used them, so the caching
// allocator hands out only memory that no queued kernel still reads. That lets a block's upload
// run while the kernels queued before it still compute.
//
// Note: completion is learnt from a host function queued behind the copy (cudaLaunchHostFunc).
// It only hands `done` to the completion thread: `done` takes the store's mutex, and a thread
// holding that mutex may make a CUDA call (the host arena page-locks chunks with
// cudaHostRegister) that waits for the very stream the host function blocks.
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

  torch::Tensor allocate(std::int64_t bytes) override {
    c10::cuda::CUDAGuard device_guard(device_.index());
    c10::cuda::CUDAStreamGuard stream_guard(to_device_);
    return torch::empty({bytes}, torch::TensorOptions().dtype(torch::kUInt8).device(device_));
  }

  void retire(const torch::Tensor& memory) override {
    if (memory.defined()) memory.record_stream(c10::cuda::getCurrentCUDAStream(device_.index()));
  }

  std::shared_ptr<DeviceEvent> record_current_stream() override {
    c10::cuda::CUDAGuard device_guard(device_.index());
    return std::make_shared<CudaEvent>(device_.index(),
                                       c10::cuda::getCurrentCUDAStream(device_.index()));
  }

  std::shared_ptr<DeviceEvent> copy(torch::Tensor destination, const torch::Tensor& source,
                                    DeviceEvent* after,
                                    std::function<void()> done) override {
    c10::cuda::CUDAGuard device_guard(device_.index());
    c10::cuda::CUDAStream stream = destination.is_cuda() ? to_device_ : to_host_;
    if (after != nullptr) static_cast<CudaEvent*>(after)->block(stream);
    {
      c10::cuda::CUDAStreamGuard stream_guard(stream);
      destination.copy_(source, /*non_blocking=*/true);
    }
    auto copied = std::make_shared<CudaEvent>(device_.index(), stream);
    auto pending = std::make_unique<PendingCopy>(PendingCopy{&completions_, std::move(done)});
    C10_CUDA_CHECK(cudaLaunchHostFunc(stream.stream(), &post_done, pending.get()));
    pending.release();
    return copied;
  }

 private:
  torch::Device device_;
  c10::cuda::CUDAStream to_device_;
  c10::cuda::CUDAStream to_host_;
  // Destroyed after the destructor synchronized the streams: every host function has posted.
  CompletionThread completions_;
};

}  // namespace

std::unique_ptr<DeviceCopier> make_cuda_copier(torch::Device device) {
  return std::make_unique<CudaCopier>(device);
}

}  // namespace ferry::detail

#endif  // FERRY_WITH_CUDA
