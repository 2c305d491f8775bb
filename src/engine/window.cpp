#include "engine/window.h"

#include <algorithm>

#include "ferry/check.h"

namespace ferry::detail {

DeviceWindow::DeviceWindow(Store& store, std::size_t capacity) : store_(store), capacity_(capacity) {
  FERRY_CHECK(capacity >= 1, "a device window needs room for one visit");
}

DeviceWindow::~DeviceWindow() {
  try {
    finish();
  } catch (...) {
  }
}

void DeviceWindow::begin(std::vector<std::vector<BundleId>> visits, std::vector<BundleId> keep_staging) {
  finish();
  visits_ = std::move(visits);
  keep_staging_ = std::move(keep_staging);
  next_fetch_ = 0;
  departed_ = 0;
}

void DeviceWindow::drop(const Visit& visit) {
  for (const Fence& fence : visit.fetched) fence.wait();
  for (const Fence& fence : visit.down) fence.wait();
  for (BundleId id : visits_[visit.index]) {
    store_.discard(id, Tier::kGpu);
    const bool kept = std::find(keep_staging_.begin(), keep_staging_.end(), id) != keep_staging_.end();
    if (!kept && store_.spec(id).home == Tier::kNvme &&
        store_.state(id, Tier::kHost) != CopyState::kAbsent) {
      store_.evict(id, Tier::kHost);
    }
  }
}

void DeviceWindow::release(std::size_t keep) {
  while (!held_.empty() && held_.front().index < departed_) {
    bool done = true;
    for (const Fence& fence : held_.front().down) done = done && fence.ready();
    if (!done && held_.size() <= keep) return;
    drop(held_.front());
    held_.pop_front();
  }
}

void DeviceWindow::arrive(std::size_t k) {
  FERRY_ASSERT(k == departed_, "visit ", k, " arrives before visit ", departed_, " departed");
  for (; next_fetch_ < visits_.size() && next_fetch_ < k + capacity_; ++next_fetch_) {
    // Departed visits leave as their copies home finish; the visit needed now waits for room.
    release(next_fetch_ == k ? capacity_ - 1 : SIZE_MAX);
    if (held_.size() >= capacity_) break;
    Visit visit{next_fetch_, {}, {}};
    for (BundleId id : visits_[next_fetch_]) visit.fetched.push_back(store_.fetch(id, Tier::kGpu));
    held_.push_back(std::move(visit));
  }
  for (Visit& visit : held_) {
    if (visit.index != k) continue;
    for (const Fence& fence : visit.fetched) fence.order_current_stream();
    return;
  }
  FERRY_ASSERT(false, "visit ", k, " was not fetched");
}

void DeviceWindow::settle(std::size_t k) {
  for (Visit& visit : held_) {
    if (visit.index != k) continue;
    for (const Fence& fence : visit.fetched) fence.wait();
    visit.fetched.clear();
  }
}

void DeviceWindow::depart(std::size_t k, std::vector<Fence> down) {
  FERRY_ASSERT(k == departed_, "visit ", k, " departs out of order");
  for (Visit& visit : held_) {
    if (visit.index == k) visit.down = std::move(down);
  }
  ++departed_;
  release(SIZE_MAX);
}

void DeviceWindow::finish() {
  departed_ = std::max(departed_, next_fetch_);
  release(0);
  visits_.clear();
  keep_staging_.clear();
  next_fetch_ = departed_ = 0;
}

}  // namespace ferry::detail
