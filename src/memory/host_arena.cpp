#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "ferry/io.h"
#include "ferry/memory.h"
#include "memory/page_lock.h"

namespace ferry {
namespace {

constexpr size_t kMaxChunkBytes = size_t{1} << 30;

size_t round_up(size_t bytes) { return (bytes + kIoAlignment - 1) / kIoAlignment * kIoAlignment; }

}  // namespace

// One mapping. Free space is kept as offset → length, coalesced on free.
struct HostArena::Chunk {
  char* base = nullptr;
  size_t bytes = 0;
  size_t used = 0;
  std::string page_lock;
  bool registered = false;
  std::map<size_t, size_t> free_ranges;

  bool contains(const void* pointer) const {
    auto p = static_cast<const char*>(pointer);
    return p >= base && p < base + bytes;
  }
};

HostBlock::HostBlock(HostBlock&& other) noexcept
    : arena_(other.arena_), data_(other.data_), bytes_(other.bytes_) {
  other.arena_ = nullptr;
  other.data_ = nullptr;
  other.bytes_ = 0;
}

HostBlock& HostBlock::operator=(HostBlock&& other) noexcept {
  if (this != &other) {
    reset();
    std::swap(arena_, other.arena_);
    std::swap(data_, other.data_);
    std::swap(bytes_, other.bytes_);
  }
  return *this;
}

HostBlock::~HostBlock() { reset(); }

void HostBlock::reset() {
  if (data_ != nullptr) arena_->free(data_, bytes_);
  arena_ = nullptr;
  data_ = nullptr;
  bytes_ = 0;
}

HostArena::HostArena(HostArenaOptions options, IoEngine* io) : options_(std::move(options)), io_(io) {
  FERRY_CHECK(options_.budget_bytes > 0, options_.name, " budget is 0 bytes: give a positive budget");
  FERRY_CHECK(options_.chunk_bytes >= kIoAlignment && options_.chunk_bytes <= kMaxChunkBytes &&
                  options_.chunk_bytes % kIoAlignment == 0,
              options_.name, " arena chunk size ", options_.chunk_bytes,
              " bytes is invalid: use a multiple of 4096 up to 1 GiB");
  page_lock_ = options_.page_lock ? "none mapped yet" : "disabled";
}

HostArena::~HostArena() {
  std::lock_guard<std::mutex> lock(mutex_);
  FERRY_ASSERT(in_use_bytes_.load() == 0, options_.name, " arena destroyed with ",
               in_use_bytes_.load(), " bytes still in blocks");
  release_unused_locked();
}

HostBlock HostArena::allocate(size_t bytes) {
  HostBlock block = try_allocate(bytes);
  if (!block) {
    HostArenaStats now = stats();
    throw BudgetExceeded(detail::concat(
        options_.name, " memory budget exceeded: a request for ", format_bytes(round_up(bytes)),
        " does not fit in the budget of ", format_bytes(now.budget_bytes), " (",
        format_bytes(now.in_use_bytes), " in use, ", format_bytes(now.mapped_bytes),
        " mapped); raise the ", options_.name, " budget or lower what must be resident"));
  }
  return block;
}

HostBlock HostArena::try_allocate(size_t bytes) {
  FERRY_CHECK(bytes > 0, "a ", options_.name, " arena block needs at least 1 byte");
  size_t rounded = round_up(bytes);
  std::lock_guard<std::mutex> lock(mutex_);
  void* data = carve_locked(rounded);
  if (data == nullptr && map_chunk_locked(rounded) != nullptr) data = carve_locked(rounded);
  if (data == nullptr) {
    refusals_.fetch_add(1, std::memory_order_relaxed);
    return HostBlock();
  }
  allocations_.fetch_add(1, std::memory_order_relaxed);
  note_peak(peak_in_use_bytes_, in_use_bytes_.fetch_add(rounded) + rounded);
  return HostBlock(this, data, rounded);
}

void* HostArena::carve_locked(size_t bytes) {
  for (auto& chunk : chunks_) {
    for (auto range = chunk->free_ranges.begin(); range != chunk->free_ranges.end(); ++range) {
      if (range->second < bytes) continue;
      size_t offset = range->first;
      size_t remaining = range->second - bytes;
      chunk->free_ranges.erase(range);
      if (remaining > 0) chunk->free_ranges.emplace(offset + bytes, remaining);
      chunk->used += bytes;
      return chunk->base + offset;
    }
  }
  return nullptr;
}

// Note: where the budget spans several chunks, a chunk holds a whole number of blocks of the
// request that maps it. A job's bundles come in a few sizes, most a multiple of one another (a
// block's compute-dtype parameters, twice that for its fp32 master and each state), so a chunk
// cut to one of them packs the others without a remainder too small for any: 1 GiB chunks of
// 151 MiB bundles left 118 MiB of each unused, 2.9 GiB of a 24 GiB budget, and a bundle was
// refused with that much free. A budget of one chunk maps it whole.
HostArena::Chunk* HostArena::map_chunk_locked(size_t bytes) {
  const bool cut = options_.budget_bytes > options_.chunk_bytes && bytes < options_.chunk_bytes;
  size_t wanted = cut ? options_.chunk_bytes / bytes * bytes : std::max(options_.chunk_bytes, bytes);
  if (mapped_bytes_.load() + wanted > options_.budget_bytes) release_unused_locked();
  size_t room = options_.budget_bytes - mapped_bytes_.load();
  if (room < bytes) return nullptr;
  size_t size = std::min(wanted, room / kIoAlignment * kIoAlignment);

  void* base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  FERRY_CHECK(base != MAP_FAILED, "mmap of ", format_bytes(size), " for the ", options_.name,
              " arena failed: ", std::strerror(errno), "; lower the ", options_.name, " budget");
  auto chunk = std::make_unique<Chunk>();
  chunk->base = static_cast<char*>(base);
  chunk->bytes = size;
  chunk->free_ranges.emplace(0, size);
  if (options_.page_lock) {
    chunk->page_lock = detail::lock_pages(base, size);
    page_lock_ = chunk->page_lock;
  }
  if (io_ != nullptr && size <= kMaxChunkBytes) {
    io_->register_buffer(base, size);
    chunk->registered = true;
  }
  note_peak(peak_mapped_bytes_, mapped_bytes_.fetch_add(size) + size);
  chunks_.push_back(std::move(chunk));
  return chunks_.back().get();
}

void HostArena::free(void* data, size_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto owner = std::find_if(chunks_.begin(), chunks_.end(),
                            [data](const auto& chunk) { return chunk->contains(data); });
  FERRY_ASSERT(owner != chunks_.end(), "freed a block the ", options_.name, " arena does not own");
  Chunk& chunk = **owner;
  size_t offset = static_cast<size_t>(static_cast<char*>(data) - chunk.base);
  auto next = chunk.free_ranges.emplace(offset, bytes).first;
  if (auto after = std::next(next);
      after != chunk.free_ranges.end() && offset + bytes == after->first) {
    next->second += after->second;
    chunk.free_ranges.erase(after);
  }
  if (next != chunk.free_ranges.begin()) {
    auto before = std::prev(next);
    if (before->first + before->second == offset) {
      before->second += next->second;
      chunk.free_ranges.erase(next);
    }
  }
  chunk.used -= bytes;
  in_use_bytes_.fetch_sub(bytes);
}

void HostArena::release_unused() {
  std::lock_guard<std::mutex> lock(mutex_);
  release_unused_locked();
}

void HostArena::release_unused_locked() {
  for (auto it = chunks_.begin(); it != chunks_.end();) {
    Chunk& chunk = **it;
    if (chunk.used != 0) {
      ++it;
      continue;
    }
    if (chunk.registered) io_->unregister_buffer(chunk.base);
    if (!chunk.page_lock.empty()) detail::unlock_pages(chunk.base, chunk.bytes, chunk.page_lock);
    munmap(chunk.base, chunk.bytes);
    mapped_bytes_.fetch_sub(chunk.bytes);
    it = chunks_.erase(it);
  }
}

void HostArena::note_peak(std::atomic<uint64_t>& peak, uint64_t value) {
  uint64_t seen = peak.load(std::memory_order_relaxed);
  while (value > seen && !peak.compare_exchange_weak(seen, value, std::memory_order_relaxed)) {
  }
}

HostArenaStats HostArena::stats() const {
  HostArenaStats stats;
  stats.budget_bytes = options_.budget_bytes;
  stats.mapped_bytes = mapped_bytes_.load(std::memory_order_relaxed);
  stats.in_use_bytes = in_use_bytes_.load(std::memory_order_relaxed);
  stats.peak_mapped_bytes = peak_mapped_bytes_.load(std::memory_order_relaxed);
  stats.peak_in_use_bytes = peak_in_use_bytes_.load(std::memory_order_relaxed);
  stats.allocations = allocations_.load(std::memory_order_relaxed);
  stats.refusals = refusals_.load(std::memory_order_relaxed);
  std::lock_guard<std::mutex> lock(mutex_);
  stats.chunks = chunks_.size();
  stats.page_lock = page_lock_;
  return stats;
}

}  // namespace ferry
