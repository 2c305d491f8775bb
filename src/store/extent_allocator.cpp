#include "store/extent_allocator.h"

#include <algorithm>
#include <iterator>

#include "ferry/check.h"
#include "ferry/io.h"

namespace ferry::detail {
namespace {

std::uint64_t round_up(std::uint64_t bytes) {
  return (bytes + kIoAlignment - 1) / kIoAlignment * kIoAlignment;
}

}  // namespace

ExtentAllocator::ExtentAllocator(std::uint64_t capacity_bytes)
    : capacity_bytes_(capacity_bytes / kIoAlignment * kIoAlignment) {
  if (capacity_bytes_ > 0) free_ranges_.emplace(0, capacity_bytes_);
}

std::optional<std::uint64_t> ExtentAllocator::allocate(std::uint64_t bytes) {
  FERRY_ASSERT(bytes > 0, "an NVMe extent needs at least 1 byte");
  std::uint64_t rounded = round_up(bytes);
  for (auto range = free_ranges_.begin(); range != free_ranges_.end(); ++range) {
    if (range->second < rounded) continue;
    std::uint64_t offset = range->first;
    std::uint64_t remaining = range->second - rounded;
    free_ranges_.erase(range);
    if (remaining > 0) free_ranges_.emplace(offset + rounded, remaining);
    used_bytes_ += rounded;
    return offset;
  }
  return std::nullopt;
}

bool ExtentAllocator::allocate_at(std::uint64_t offset, std::uint64_t bytes) {
  FERRY_ASSERT(bytes > 0, "an NVMe extent needs at least 1 byte");
  std::uint64_t rounded = round_up(bytes);
  if (offset % kIoAlignment != 0) return false;
  auto range = free_ranges_.upper_bound(offset);
  if (range == free_ranges_.begin()) return false;
  range = std::prev(range);
  const std::uint64_t begin = range->first, end = range->first + range->second;
  if (offset + rounded > end) return false;
  free_ranges_.erase(range);
  if (offset > begin) free_ranges_.emplace(begin, offset - begin);
  if (offset + rounded < end) free_ranges_.emplace(offset + rounded, end - offset - rounded);
  used_bytes_ += rounded;
  return true;
}

void ExtentAllocator::free(std::uint64_t offset, std::uint64_t bytes) {
  std::uint64_t rounded = round_up(bytes);
  FERRY_ASSERT(offset % kIoAlignment == 0 && offset + rounded <= capacity_bytes_ &&
                   rounded <= used_bytes_,
               "freed an NVMe extent [", offset, ", +", rounded, ") that was never allocated");
  auto inserted = free_ranges_.emplace(offset, rounded);
  FERRY_ASSERT(inserted.second, "NVMe extent at ", offset, " freed twice");
  auto range = inserted.first;
  if (auto after = std::next(range);
      after != free_ranges_.end() && offset + rounded == after->first) {
    range->second += after->second;
    free_ranges_.erase(after);
  }
  if (range != free_ranges_.begin()) {
    auto before = std::prev(range);
    FERRY_ASSERT(before->first + before->second <= offset, "NVMe extent at ", offset,
                 " overlaps a free range");
    if (before->first + before->second == offset) {
      before->second += range->second;
      free_ranges_.erase(range);
    }
  }
  used_bytes_ -= rounded;
}

std::uint64_t ExtentAllocator::largest_free_bytes() const {
  std::uint64_t largest = 0;
  for (const auto& range : free_ranges_) largest = std::max(largest, range.second);
  return largest;
}

}  // namespace ferry::detail
