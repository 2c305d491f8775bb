#pragma once

// Copies between the GPU tier and the pinned host tier. With CUDA (cuda_copy.cpp) they run on a
// dedicated copy stream per direction, ordered by events; otherwise they are synchronous.

#include <functional>
#include <memory>

#include <torch/types.h>

namespace ferry::detail {

// A recorded point on a copy stream.
class DeviceEvent {
 public:
  virtual ~DeviceEvent() = default;
  // Makes work queued later on the current stream wait for the copy, without blocking the host.
  virtual void block_current_stream() = 0;
};

class DeviceCopier {
 public:
  virtual ~DeviceCopier() = default;  // waits for copies in flight

  // The device that GPU-tier tensors live on (with its index, where it has one).
  virtual torch::Device device() const = 0;

  // Memory for a GPU copy. With CUDA it comes from the upload stream's pool, so an upload into
  // fresh memory need not wait for the compute stream (see cuda_copy.cpp).
  virtual torch::Tensor allocate(std::int64_t bytes) = 0;
  // Called as a GPU copy's memory is dropped: it is not reused before the work queued so far on
  // the calling thread's current stream, which may still read it, has finished.
  virtual void retire(const torch::Tensor& memory) = 0;

  // Marks the work queued so far on the calling thread's current stream, for a copy that
  // another thread issues later (a GPU fetch staged through NVMe). Null when copies are
  // synchronous.
  virtual std::shared_ptr<DeviceEvent> record_current_stream() = 0;

  // Copies `source` into `destination` (same byte size; one on device(), one in pinned host
  // memory), ordered after `after` (from record_current_stream; null: no ordering, for fresh
  // memory from allocate() or a synchronous copier). `done`
  // runs exactly once, after the copy finished: before copy() returns when the copy is
  // synchronous, else on the copier's completion thread. Returns the copy's event, or null when
  // the copy already finished. Throws, without running `done`, if the copy cannot start.
  virtual std::shared_ptr<DeviceEvent> copy(torch::Tensor destination, const torch::Tensor& source,
                                            DeviceEvent* after,
                                            std::function<void()> done) = 0;
};

// A CUDA copier for a CUDA device; a synchronous one otherwise.
std::unique_ptr<DeviceCopier> make_device_copier(torch::Device device);

#if FERRY_WITH_CUDA
std::unique_ptr<DeviceCopier> make_cuda_copier(torch::Device device);
#endif

}  // namespace ferry::detail
