#include "store/fence.h"

namespace ferry {
namespace detail {
namespace {

using Clock = std::chrono::steady_clock;

std::uint64_t nanoseconds_since(Clock::time_point start) {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count());
}

double seconds(std::uint64_t nanoseconds) { return static_cast<double>(nanoseconds) * 1e-9; }

}  // namespace

void TransferCounters::begin(Tier from, Tier to) {
  Pair& pair = pairs[static_cast<int>(from)][static_cast<int>(to)];
  std::lock_guard<std::mutex> lock(busy_mutex);
  if (pair.in_flight++ == 0) pair.busy_since = Clock::now();
}

void TransferCounters::end(Tier from, Tier to, std::uint64_t bytes) {
  Pair& pair = pairs[static_cast<int>(from)][static_cast<int>(to)];
  if (bytes > 0) {
    pair.bytes.fetch_add(bytes, std::memory_order_relaxed);
    pair.transfers.fetch_add(1, std::memory_order_relaxed);
  }
  std::lock_guard<std::mutex> lock(busy_mutex);
  if (--pair.in_flight == 0) {
    pair.busy_ns.fetch_add(nanoseconds_since(pair.busy_since), std::memory_order_relaxed);
  }
}

TransferStats TransferCounters::read(Tier from, Tier to) const {
  const Pair& pair = pairs[static_cast<int>(from)][static_cast<int>(to)];
  TransferStats stats;
  stats.bytes = pair.bytes.load(std::memory_order_relaxed);
  stats.transfers = pair.transfers.load(std::memory_order_relaxed);
  stats.waited_seconds = seconds(pair.waited_ns.load(std::memory_order_relaxed));
  std::uint64_t busy_ns = pair.busy_ns.load(std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(busy_mutex);
    if (pair.in_flight > 0) busy_ns += nanoseconds_since(pair.busy_since);
  }
  stats.busy_seconds = seconds(busy_ns);
  return stats;
}

FenceState::FenceState(std::shared_ptr<TransferCounters> counters, Tier from, Tier to)
    : counters_(std::move(counters)), hop_from_(from), hop_to_(to) {}

void FenceState::wait() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!done()) {
    Tier from = hop_from_;
    Tier to = hop_to_;
    Clock::time_point start = Clock::now();
    changed_.wait(lock, [&] { return done() || hop_from_ != from || hop_to_ != to; });
    counters_->pairs[static_cast<int>(from)][static_cast<int>(to)].waited_ns.fetch_add(
        nanoseconds_since(start), std::memory_order_relaxed);
  }
  if (error_) std::rethrow_exception(error_);
}

std::shared_ptr<DeviceEvent> FenceState::wait_for_device_event() {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [&] { return done() || device_event_ != nullptr; });
  if (done()) {
    if (error_) std::rethrow_exception(error_);
    return nullptr;
  }
  return device_event_;
}

void FenceState::begin_hop(int index, Tier from, Tier to) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    hop_index_ = index;
    device_event_ = nullptr;
    hop_from_ = from;
    hop_to_ = to;
  }
  changed_.notify_all();
}

void FenceState::set_device_event(int index, std::shared_ptr<DeviceEvent> event) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (done() || hop_index_ != index) return;
    device_event_ = std::move(event);
  }
  changed_.notify_all();
}

void FenceState::complete(std::exception_ptr error) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    error_ = std::move(error);
    device_event_ = nullptr;
    done_.store(true, std::memory_order_release);
  }
  changed_.notify_all();
}

}  // namespace detail

bool Fence::ready() const { return state_ == nullptr || state_->done(); }

void Fence::wait() const {
  if (state_ != nullptr) state_->wait();
}

void Fence::order_current_stream() const {
  if (state_ == nullptr) return;
  if (std::shared_ptr<detail::DeviceEvent> event = state_->wait_for_device_event()) {
    event->block_current_stream();
  }
}

}  // namespace ferry
