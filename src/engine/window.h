#pragma once

// The device window of the streamed modes (zo2, fuyou): brings the bundles of the parts a pass
// visits to the device ahead of use, and drops them behind it once their copies home are done.

#include <cstddef>
#include <deque>
#include <vector>

#include "ferry/store.h"

namespace ferry::detail {

class DeviceWindow {
 public:
  // At most `capacity` visits hold device copies at once (the one computing included).
  DeviceWindow(Store& store, std::size_t capacity);
  ~DeviceWindow();

  // Starts a pass: visit k brings visits[k] (bundles whose home is not the device) to the device.
  // The host staging copies of NVMe bundles are dropped with the device copies, except those of
  // bundles in `keep_staging`, which the caller takes over (fuyou's optimizer writes the updated
  // parameters into them).
  void begin(std::vector<std::vector<BundleId>> visits, std::vector<BundleId> keep_staging = {});
  // Orders the current stream after visit k's uploads (the host does not wait; read the copies
  // with Store::device_tensor_in_flight) and fetches later visits as room allows.
  void arrive(std::size_t k);
  // Blocks until visit k's uploads are done, so that its copies can change state (mark_dirty,
  // write_back). Call it after queuing the visit's work, so the device is not left idle.
  void settle(std::size_t k);
  // Visit k's work is queued on the current stream; `down` are its copies on their way home.
  // Its device copies (and NVMe staging copies) are dropped once those finish, with any changes
  // that were not sent home.
  void depart(std::size_t k, std::vector<Fence> down);
  // Drops every device copy of the pass, waiting for the copies home.
  void finish();

 private:
  struct Visit {
    std::size_t index;
    std::vector<Fence> fetched;
    std::vector<Fence> down;
  };
  // Releases departed visits whose copies home are done; while more than `keep` visits hold
  // copies, waits for the oldest departed one.
  void release(std::size_t keep);
  void drop(const Visit& visit);

  Store& store_;
  std::size_t capacity_;
  std::vector<std::vector<BundleId>> visits_;
  std::vector<BundleId> keep_staging_;
  std::deque<Visit> held_;  // visits with device copies, in visiting order
  std::size_t next_fetch_ = 0;
  std::size_t departed_ = 0;  // visits before it have departed
};

}  // namespace ferry::detail
