#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>

#include "ferry/store.h"
#include "store/device_copy.h"

namespace ferry::detail {

// Per tier pair counters behind StoreStats::transfers; atomics, so stats() takes no store lock.
struct TransferCounters {
  struct Pair {
    std::atomic<std::uint64_t> bytes{0};
    std::atomic<std::uint64_t> transfers{0};
    std::atomic<std::uint64_t> busy_ns{0};
    std::atomic<std::uint64_t> waited_ns{0};
    // Guarded by busy_mutex: transfers of this pair in flight and since when.
    int in_flight = 0;
    std::chrono::steady_clock::time_point busy_since;
  };

  void begin(Tier from, Tier to);
  // Ends one transfer; `bytes` moved (0 when it failed).
  void end(Tier from, Tier to, std::uint64_t bytes);
  TransferStats read(Tier from, Tier to) const;

  Pair pairs[kTierCount][kTierCount];
  mutable std::mutex busy_mutex;
};

// What a Fence waits on: one fetch or write-back, which may take two hops (NVMe <-> host <-> GPU).
//
// Note: the store completes a FenceState after it applied the transfer's state transitions, so
// a caller that returns from Fence::wait sees the new states. FenceState's mutex is a leaf: the
// store takes it while holding its own mutex, never the other way round.
class FenceState {
 public:
  FenceState(std::shared_ptr<TransferCounters> counters, Tier from, Tier to);

  bool done() const { return done_.load(std::memory_order_acquire); }
  // Blocks until done; rethrows the transfer's error. Time blocked counts as waited on the hop
  // in progress.
  void wait();
  // The device copy that the current stream can wait on without blocking the host, once the
  // transfer reached it; null when the transfer is done (after rethrowing its error).
  std::shared_ptr<DeviceEvent> wait_for_device_event();

  // Starts hop `index` (0 or 1) of the transfer.
  void begin_hop(int index, Tier from, Tier to);
  // The device copy of hop `index`, unless that hop already ended.
  void set_device_event(int index, std::shared_ptr<DeviceEvent> event);
  void complete(std::exception_ptr error);

 private:
  std::shared_ptr<TransferCounters> counters_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::atomic<bool> done_{false};
  std::exception_ptr error_;  // guarded by mutex_
  int hop_index_ = 0;         // guarded by mutex_
  Tier hop_from_;             // guarded by mutex_
  Tier hop_to_;               // guarded by mutex_
  std::shared_ptr<DeviceEvent> device_event_;  // guarded by mutex_
};

}  // namespace ferry::detail
