#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "io/backend.h"

namespace ferry::detail {

// One read or write as the caller submitted it, split into transfers.
class IoRequest {
 public:
  IoRequest(IoOp op, IoCallback callback) : op_(op), callback_(std::move(callback)) {}

  bool done() const { return done_.load(std::memory_order_acquire); }
  std::optional<IoError> wait();

 private:
  friend class IoScheduler;
  void finish();  // runs the callback and wakes waiters; called once, without scheduler locks

  const IoOp op_;
  IoCallback callback_;
  std::vector<std::unique_ptr<Transfer>> transfers_;
  size_t unfinished_ = 0;  // guarded by the scheduler's mutex
  std::optional<IoError> error_;  // the first failure; guarded by the scheduler's mutex

  std::atomic<bool> done_{false};
  std::mutex done_mutex_;
  std::condition_variable done_signal_;
};

// Owns the backend and everything backends have in common: splitting requests into aligned
// transfers, the queue-depth limit, short-transfer continuation, EAGAIN retries, injected
// faults, fixed-buffer lookup and statistics.
//
// Note: lock ordering. mutex_ guards the pending queue, in-flight count, request bookkeeping
// and the buffer registry, and is held while the backend submits (io_uring's submission queue
// is single-producer). Callbacks and waiter wake-ups run after it is released, so a callback
// may submit more I/O.
class IoScheduler final : public CompletionSink {
 public:
  IoScheduler(const IoOptions& options, std::unique_ptr<IoBackend> backend);
  ~IoScheduler() override;

  IoBackend& backend() { return *backend_; }
  std::shared_ptr<IoRequest> submit(IoOp op, StripedFile& file, uint64_t offset, char* buffer,
                                    size_t length, IoCallback callback);
  void complete(Transfer* transfer, int64_t result) override;
  void drain();

  void register_buffer(void* base, size_t bytes);
  void unregister_buffer(void* base);

  IoStats stats() const;

 private:
  struct Region {
    char* base;
    size_t bytes;
    int slot;
  };
  // A transfer that ended without reaching the backend (an injected fault) or must be
  // finished after the lock is dropped.
  struct Outcome {
    Transfer* transfer;
    int64_t result;
  };

  void split(IoRequest* request, StripedFile& file, uint64_t offset, char* buffer, size_t length);
  void add_transfer(IoRequest* request, File* file, uint64_t offset, char* buffer, size_t length,
                    bool direct);
  int fixed_slot_locked(const char* buffer, size_t length) const;
  // Moves queued transfers to the backend while fewer than queue_depth are in flight.
  void pump_locked(std::vector<Outcome>* outcomes);
  // Decides what one queued transfer does next: true to hand it to the backend, false when it
  // ended here (an injected fault, or its request already failed) and went to outcomes.
  bool prepare_locked(Transfer* transfer, std::vector<Outcome>* outcomes);
  // Applies one backend result; may queue more outcomes and returns a request it finished.
  std::shared_ptr<IoRequest> apply_locked(const Outcome& outcome);
  // Applies outcomes until none are left, finishing requests outside the lock.
  void settle(std::vector<Outcome> outcomes);
  // Records the end of one transfer; returns the request if that finished it.
  std::shared_ptr<IoRequest> retire_locked(Transfer* transfer, std::optional<IoError> error);
  void note_in_flight_locked(int delta);

  const IoOptions options_;
  std::unique_ptr<IoBackend> backend_;

  mutable std::mutex mutex_;
  std::condition_variable idle_;
  std::deque<Transfer*> queued_;
  size_t in_flight_ = 0;
  std::unordered_map<IoRequest*, std::shared_ptr<IoRequest>> live_;  // not yet finished
  size_t finishing_ = 0;  // requests retired whose callbacks have not returned yet
  std::vector<Region> regions_;                    // sorted by base
  std::chrono::steady_clock::time_point busy_since_;
  std::atomic<double> busy_seconds_{0};

  std::atomic<uint64_t> bytes_read_{0};
  std::atomic<uint64_t> bytes_written_{0};
  std::atomic<uint64_t> requests_{0};
  std::atomic<uint64_t> transfers_{0};
  std::atomic<uint64_t> resubmitted_{0};
  std::atomic<uint64_t> retried_{0};
  std::atomic<uint64_t> buffered_transfers_{0};
  std::atomic<uint64_t> fixed_buffer_transfers_{0};
  std::atomic<uint64_t> failed_requests_{0};
};

}  // namespace ferry::detail
