#pragma once

#include <cstdint>
#include <map>
#include <optional>

namespace ferry::detail {

// Places the NVMe tier's extents in [0, capacity) of the store's file: first fit over the free
// ranges, 4096-aligned, freed neighbours coalescing. Not thread-safe: the store calls it under
// its mutex.
class ExtentAllocator {
 public:
  // capacity_bytes is rounded down to a multiple of 4096.
  explicit ExtentAllocator(std::uint64_t capacity_bytes);

  // The offset of a free extent of `bytes` (rounded up to 4096), or nullopt when no free range
  // is large enough.
  std::optional<std::uint64_t> allocate(std::uint64_t bytes);
  // Takes the extent of `bytes` (rounded up to 4096) at `offset`, for a layout kept from an earlier
  // store; false when any of it is not free.
  bool allocate_at(std::uint64_t offset, std::uint64_t bytes);
  // Returns an extent that allocate(bytes) handed out.
  void free(std::uint64_t offset, std::uint64_t bytes);

  std::uint64_t capacity_bytes() const { return capacity_bytes_; }
  std::uint64_t used_bytes() const { return used_bytes_; }
  std::uint64_t largest_free_bytes() const;

 private:
  std::uint64_t capacity_bytes_;
  std::uint64_t used_bytes_ = 0;
  std::map<std::uint64_t, std::uint64_t> free_ranges_;  // offset -> length
};

}  // namespace ferry::detail
