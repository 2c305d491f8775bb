#pragma once

// The pinned host arena: page-locked host memory under a hard byte budget, handed out as
// aligned blocks with owning handles. Chunks are mapped lazily, page-locked (cudaHostRegister
// when CUDA is present, mlock otherwise) and registered with the I/O engine as fixed buffers.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ferry/check.h"

namespace ferry {

class IoEngine;

// A request the budget cannot satisfy. The message names the budget, what is in use and the
// request.
class BudgetExceeded : public Error {
 public:
  using Error::Error;
};

struct HostArenaOptions {
  size_t budget_bytes = 0;                 // hard limit on mapped bytes; required
  size_t chunk_bytes = size_t{256} << 20;  // mapping granularity; at most 1 GiB (io_uring)
  bool page_lock = true;                   // cudaHostRegister / mlock each chunk
  std::string name = "host";               // for messages: "host", "staging", ...
};

struct HostArenaStats {
  uint64_t budget_bytes = 0;
  uint64_t mapped_bytes = 0;       // counts against the budget
  uint64_t in_use_bytes = 0;       // handed out in blocks
  uint64_t peak_mapped_bytes = 0;
  uint64_t peak_in_use_bytes = 0;
  uint64_t allocations = 0;
  uint64_t refusals = 0;           // requests refused for the budget
  uint64_t chunks = 0;
  std::string page_lock;           // "cudaHostRegister", "mlock", or why memory is not locked
};

class HostArena;

// An owning handle on one block; returns it to the arena when destroyed. Movable only.
class HostBlock {
 public:
  HostBlock() = default;
  HostBlock(HostBlock&& other) noexcept;
  HostBlock& operator=(HostBlock&& other) noexcept;
  ~HostBlock();

  void* data() const { return data_; }
  template <typename T>
  T* as() const { return static_cast<T*>(data_); }
  size_t bytes() const { return bytes_; }
  explicit operator bool() const { return data_ != nullptr; }
  void reset();

 private:
  friend class HostArena;
  HostBlock(HostArena* arena, void* data, size_t bytes) : arena_(arena), data_(data), bytes_(bytes) {}

  HostArena* arena_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// Thread-safe. The arena must outlive its blocks (checked: destroying an arena with live
// blocks is an internal error).
class HostArena {
 public:
  // `io`, when given, gets each chunk registered as a fixed buffer; it must outlive the arena.
  explicit HostArena(HostArenaOptions options, IoEngine* io = nullptr);
  ~HostArena();
  HostArena(const HostArena&) = delete;
  HostArena& operator=(const HostArena&) = delete;

  // A block of `bytes`, 4096-aligned and a multiple of 4096 long, so it is ready for O_DIRECT.
  // Throws BudgetExceeded when the budget cannot hold it.
  HostBlock allocate(size_t bytes);
  // As allocate, but returns an empty block instead of throwing for the budget.
  HostBlock try_allocate(size_t bytes);

  // Unmaps chunks with no live blocks.
  void release_unused();

  HostArenaStats stats() const;
  const HostArenaOptions& options() const { return options_; }

 private:
  friend class HostBlock;
  struct Chunk;

  void free(void* data, size_t bytes);
  void* carve_locked(size_t bytes);
  Chunk* map_chunk_locked(size_t bytes);
  void release_unused_locked();
  void note_peak(std::atomic<uint64_t>& peak, uint64_t value);

  const HostArenaOptions options_;
  IoEngine* const io_;
  mutable std::mutex mutex_;
  std::vector<std::unique_ptr<Chunk>> chunks_;
  std::string page_lock_;

  std::atomic<uint64_t> mapped_bytes_{0};
  std::atomic<uint64_t> in_use_bytes_{0};
  std::atomic<uint64_t> peak_mapped_bytes_{0};
  std::atomic<uint64_t> peak_in_use_bytes_{0};
  std::atomic<uint64_t> allocations_{0};
  std::atomic<uint64_t> refusals_{0};
};

// Human-readable sizes: "1.5 GiB". parse_bytes accepts "24GiB", "512 MiB", "1e9", "4096".
std::string format_bytes(uint64_t bytes);
uint64_t parse_bytes(const std::string& text);

}  // namespace ferry
