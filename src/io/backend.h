#pragma once

// What the scheduler hands a backend: one transfer on one descriptor. The backend moves the
// bytes and reports the raw result (bytes moved, or -errno); short transfers, retries, faults
// and errors are the scheduler's business, written once for all backends.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ferry/io.h"

namespace ferry::detail {

class IoRequest;

struct Transfer {
  IoRequest* request = nullptr;
  IoOp op = IoOp::kRead;
  File* file = nullptr;
  int fd = -1;
  uint64_t offset = 0;
  char* buffer = nullptr;
  size_t length = 0;     // bytes still to move
  size_t submitted = 0;  // bytes handed to the backend this time; the backend moves these
  int fixed_slot = -1;  // registered-buffer index, or -1
  int retries = 0;
};

class CompletionSink {
 public:
  virtual ~CompletionSink() = default;
  // Called from a backend's own thread(s), never with the scheduler's lock held.
  virtual void complete(Transfer* transfer, int64_t result) = 0;
};

class IoBackend {
 public:
  virtual ~IoBackend() = default;
  virtual IoBackendKind kind() const = 0;
  virtual std::string describe() const = 0;

  // Starts the completion thread(s). Called once, before the first submit.
  virtual void start(CompletionSink* sink) = 0;
  // Hands a batch to the kernel or the workers. Called with the scheduler's lock held, so it
  // must not wait for completions. Returns 0, or -errno if the batch could not be queued.
  virtual int submit(const std::vector<Transfer*>& batch) = 0;
  // Stops the completion thread(s); nothing is in flight when it is called.
  virtual void stop() = 0;

  // Returns the fixed-buffer slot for the region, or -1 when the backend has none.
  virtual int register_buffer(void* base, size_t bytes) { return -1; }
  virtual void unregister_buffer(int slot) {}
};

// Each constructor throws BackendUnavailable with the reason and the fix.
struct BackendUnavailable {
  std::string reason;
  std::string fix;
};

std::unique_ptr<IoBackend> make_uring_backend(const IoOptions& options);
std::unique_ptr<IoBackend> make_aio_backend(const IoOptions& options);
std::unique_ptr<IoBackend> make_thread_pool_backend(const IoOptions& options);

}  // namespace ferry::detail
