#pragma once

// The residency manager (docs/architecture.md, layer 3). The unit of movement is a bundle: one part's
// tensors of one role (bf16 parameters, fp32 master, exp_avg, exp_avg_sq, gradients, an
// activation checkpoint) packed flat and aligned, so a block moves as one large transfer and one
// large NVMe extent. A bundle has a home tier and copies on other tiers, each in an explicit
// state. Copies between GPU and host run on CUDA streams ordered by events; copies between host
// and NVMe run through the I/O engine. Every tier has a hard byte budget. See docs/store.md.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/types.h>

#include "ferry/io.h"
#include "ferry/memory.h"

namespace ferry {

enum class Tier : std::uint8_t { kGpu = 0, kHost = 1, kNvme = 2 };
constexpr int kTierCount = 3;
const char* to_string(Tier tier);

// Note: the life of one copy of a bundle on one tier.
//   kAbsent -> (fetch / write_back into it) -> kLoading -> kReady
//   kReady  -> (mark_dirty) -> kDirty -> (write_back from it) -> kWritingBack -> kReady
//   kReady or kDirty with another up-to-date copy -> (evict) -> kAbsent
// A copy in kLoading or kWritingBack has a transfer in flight and may not be evicted, written to
// or read from until its Fence completes (the store itself may still copy out of a copy that is
// writing back). Which copies hold the latest contents is tracked apart from these states: after
// mark_dirty on one tier, the other tiers' copies are stale (see up_to_date) but keep their
// memory and state until they are refreshed or evicted.
enum class CopyState : std::uint8_t { kAbsent, kLoading, kReady, kDirty, kWritingBack };
const char* to_string(CopyState state);

using BundleId = std::uint32_t;

// A share of a tier's budget set aside for copies that come and go (Store::reserve).
using PoolId = std::uint32_t;
constexpr PoolId kNoPool = UINT32_MAX;

struct BundleSpec {
  std::string name;     // "block.3.master": for messages, statistics and traces
  std::uint64_t bytes;  // rounded up to 4096 for storage; views expose exactly `bytes`
  Tier home;            // where the bundle lives when nothing else holds it
  // Per tier, the pool the bundle's copies away from home draw from; kNoPool: what the tier's
  // budget has left beside its pools.
  PoolId pools[kTierCount] = {kNoPool, kNoPool, kNoPool};
};

// One hop of a transfer (NVMe <-> host or host <-> GPU), as StoreOptions::on_transfer sees it:
// from its start on the host to its completion (a device copy's span includes its wait in the
// copy stream's queue).
struct TransferSpan {
  std::string bundle;
  Tier from;
  Tier to;
  std::uint64_t bytes;  // 0 when it failed or moved nothing (a never-written NVMe copy reads as zeros)
  std::chrono::steady_clock::time_point start;
  std::chrono::steady_clock::time_point end;
};

struct StoreOptions {
  // The GPU tier's device. On a CPU-only build (or with torch::kCPU) the GPU tier is ordinary
  // memory under its own budget, so every layer runs in CI.
  torch::Device device = torch::kCPU;
  std::uint64_t gpu_budget_bytes = 0;
  std::uint64_t host_budget_bytes = 0;
  // The NVMe tier's files are striped over these. The store holds each one's DirectoryLock
  // (ferry/lock.h) while it lives: another process's store on one of them is refused.
  std::vector<std::string> nvme_directories;
  std::uint64_t nvme_budget_bytes = UINT64_MAX;
  std::size_t stripe_bytes = std::size_t{1} << 20;
  IoOptions io;
  // How long a fetch that would pass a budget waits for other threads' evictions before it
  // fails with BudgetExceeded naming the tier and the shortfall.
  double budget_wait_seconds = 0;
  std::string nvme_file_name = "ferry-store.bin";
  // Opens the NVMe tier's files; nullptr means Env::posix(). Tests pass a FaultInjectingEnv.
  Env* env = nullptr;
  // Called once per hop as it ends, on the thread that completes it, without the store's lock
  // held: for traces. It must not call back into the store; what it throws is dropped.
  std::function<void(const TransferSpan&)> on_transfer;
  // Counts without allocating or moving anything: add, adopt and reserve account their bytes
  // per tier (peaks and budgets included) and touch no memory or file; every call that would
  // move or expose data throws. A set-up run against it is that set-up's dry run.
  bool count_only = false;
};

namespace detail {
struct FenceState;
}

// Completion of an asynchronous copy. Copyable; a default Fence is complete.
class Fence {
 public:
  Fence() = default;
  explicit Fence(std::shared_ptr<detail::FenceState> state) : state_(std::move(state)) {}
  bool ready() const;
  // Blocks the calling thread; throws IoException if an NVMe transfer behind it failed.
  void wait() const;
  // Makes work queued later on the current CUDA stream wait for this copy without blocking the
  // host (cudaStreamWaitEvent); on the CPU it waits.
  void order_current_stream() const;

 private:
  std::shared_ptr<detail::FenceState> state_;
};

struct TierStats {
  std::uint64_t budget_bytes = 0;
  std::uint64_t used_bytes = 0;
  std::uint64_t peak_bytes = 0;
  std::uint64_t refusals = 0;
};

// One direction between two tiers.
struct TransferStats {
  std::uint64_t bytes = 0;
  std::uint64_t transfers = 0;
  double busy_seconds = 0;    // time with at least one transfer of this pair in flight
  double waited_seconds = 0;  // time callers spent blocked in Fence::wait on this pair
};

struct PoolStats {
  std::string name;
  Tier tier = Tier::kGpu;
  std::uint64_t bytes = 0;  // set aside (counted in its tier's used and peak bytes)
  std::uint64_t used_bytes = 0;
  std::uint64_t peak_bytes = 0;
};

struct StoreStats {
  TierStats tiers[kTierCount];
  TransferStats transfers[kTierCount][kTierCount];  // [from][to]
  std::vector<PoolStats> pools;  // by PoolId; released ones keep their figures
};

class Store {
 public:
  explicit Store(StoreOptions options);
  ~Store();  // waits for transfers in flight
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  const StoreOptions& options() const { return options_; }

  // Registers a bundle and allocates its home copy (zero-filled, kReady). Throws BudgetExceeded
  // when the home tier's budget cannot hold it.
  BundleId add(const BundleSpec& spec);
  // Registers a bundle at home on NVMe whose copy already lies in the store's file at
  // `nvme_offset`, from a layout an earlier store left there (NvmeLayout): kReady without any I/O.
  // `holds_data` false makes the copy read as zeros, as add() does. Throws ferry::Error when the
  // extent is not free or passes the NVMe budget.
  BundleId adopt(const BundleSpec& spec, std::uint64_t nvme_offset, bool holds_data);
  const BundleSpec& spec(BundleId id) const;

  // Sets `bytes` of `tier`'s budget aside for copies that come and go (a device window, gradients
  // on their way down, the staging of what lives on NVMe), drawn by the bundles whose
  // BundleSpec::pools name it. A copy drawn from a pool waits for room in it as a copy beyond a
  // budget waits (budget_wait_seconds) and then fails with BudgetExceeded naming the pool, so a
  // step never takes more than its set-up reserved. Throws BudgetExceeded, naming the pool, when
  // the tier cannot hold it.
  PoolId reserve(Tier tier, std::uint64_t bytes, const std::string& name);
  // Returns a pool's bytes to its tier. Throws ferry::Error while a copy still draws from it.
  void release(PoolId pool);
  // Where the bundle's NVMe copy lies in the store's file. Throws when it has none.
  std::uint64_t nvme_offset(BundleId id) const;
  // fdatasync of the NVMe file (every stripe): what was written back is durable on return.
  void sync_nvme();
  std::size_t size() const;  // ids handed out, removed ones included

  CopyState state(BundleId id, Tier tier) const;
  // Whether the copy on `tier` holds the bundle's latest contents. A copy that another tier's
  // mark_dirty made stale keeps its memory and its state (kReady) but is not up to date: fetch
  // refreshes it, and it may be evicted or overwritten freely.
  bool up_to_date(BundleId id, Tier tier) const;

  // The GPU or host copy as a flat uint8 tensor of spec.bytes (a view of the bundle's memory:
  // device memory, or the pinned host arena). Throws unless the copy is kReady or kDirty.
  torch::Tensor tensor(BundleId id, Tier tier) const;

  // The GPU copy's memory while a fetch into it may still be in flight, for work queued on the
  // current stream after that fetch's Fence::order_current_stream(): a kernel can be queued
  // behind an upload without the host waiting for it. Throws unless the GPU copy is loading,
  // ready or dirty.
  torch::Tensor device_tensor_in_flight(BundleId id) const;

  // Makes the copy on `to` up to date from the nearest up-to-date copy (GPU <- host <- NVMe;
  // NVMe -> GPU stages through a host copy, which stays). Allocates `to`'s copy if absent; a
  // copy already up to date returns a complete Fence, and one already loading the latest contents
  // returns that transfer's Fence.
  Fence fetch(BundleId id, Tier to);
  // Gives the bundle a zero-filled copy on `tier` (gpu or host) that the caller is about to
  // write, without moving anything: the copy is kDirty, the other copies stale. For scratch
  // contents such as a part's gradients, whose device copy lives only while backward writes it.
  // Waits for room like fetch; throws for a copy that is not absent.
  void allocate(BundleId id, Tier tier);
  // The copy on `tier` was modified by the caller: other tiers' copies become stale.
  void mark_dirty(BundleId id, Tier tier);
  // Copies `from` (kReady or kDirty, up to date) to `to`, allocating it if absent; `from` is
  // clean afterwards. GPU <-> NVMe stages through a host copy, which stays. Nothing moves when
  // `to` is already up to date.
  Fence write_back(BundleId id, Tier from, Tier to);
  // Drops the copy on `tier`. Throws ferry::Error for the home copy, the only up-to-date copy,
  // an absent copy, or a copy with a transfer in flight.
  void evict(BundleId id, Tier tier);

  // Drops the copy on `tier` and the changes only it holds: the newest remaining copy is the
  // bundle's contents again. For scratch edits whose result is recomputed later (zo2 replays the
  // updates a block's home copy lacks instead of writing them home every step). Throws
  // ferry::Error for the home copy, an absent copy, or a copy with a transfer in flight.
  void discard(BundleId id, Tier tier);

  // Frees every copy of the bundle and retires its id (later calls with it throw): for scratch
  // bundles outgrown by a new size, such as an activation checkpoint when a larger batch comes.
  // Throws ferry::Error for a copy with a transfer in flight.
  void remove(BundleId id);

  // Waits for every transfer in flight.
  void synchronize();

  StoreStats stats() const;

 private:
  void drop(BundleId id, Tier tier, bool keep_only_latest);
  BundleId insert(const BundleSpec& spec, std::optional<std::uint64_t> nvme_offset, bool holds_data);

  struct Impl;
  StoreOptions options_;
  std::unique_ptr<Impl> impl_;
};

// --- A layout kept on NVMe --------------------------------------------------------------------
// A store's NVMe file outlives the store when a manifest says what lies where (`ferry stage`
// writes one, an engine adopts it: docs/stage.md). The store layer keeps it generic: what the
// layout was made for is `identity` (compared key by key by whoever adopts it), and each bundle is
// a name, a size, an offset and a checksum.

// XXH64 (Collet's xxHash, 64-bit), the layout's checksum: fast enough to check a bundle as it is
// read. Equals the reference implementation for every input and seed.
std::uint64_t xxh64(const void* data, std::size_t bytes, std::uint64_t seed = 0);

struct LayoutBundle {
  std::string name;
  std::uint64_t bytes = 0;        // the bundle's size; storage is this rounded up to 4096
  std::uint64_t nvme_offset = 0;  // in the store's (striped) file
  // false: the bundle is zeros (optimizer states before the first step, gradients): recorded,
  // never written; the store reads it as zeros without I/O.
  bool holds_data = true;
  bool complete = false;      // durable on NVMe (fdatasync) with `checksum` over its storage bytes
  std::uint64_t checksum = 0;
  // XXH64 of each kLayoutChunkBytes of the bundle (the last one shorter), so that an adopter can
  // check a sample of the bundle without reading it whole. Empty for a layout an earlier ferry
  // staged.
  std::vector<std::uint64_t> chunk_checksums = {};
};

inline constexpr std::uint64_t kLayoutChunkBytes = std::uint64_t{16} << 20;

// Where one directory of a layout was when it was staged: a copy (cp -a, rsync, a restore from a
// backup) has other inodes, a move within the filesystem keeps them.
struct LayoutBinding {
  std::uint64_t directory_inode = 0;
  std::uint64_t file_inode = 0;        // the store's file in the directory
  std::int64_t file_birth_ns = 0;      // its birth time where the filesystem records one, else 0
};

struct NvmeLayout {
  std::map<std::string, std::string> identity;  // what the layout was made for
  std::map<std::string, std::string> metadata;  // kept alongside, not compared
  // The file's stripes, in order. Note: the manifest records them relative to its own directory
  // and read_nvme_layout resolves them against where it is now, so a layout that was moved
  // (or a copy) names its own directories, never the original's.
  std::vector<std::string> directories;
  // This layout's own identity: a random id given when it was staged, and per directory the
  // inodes it was staged on (bind_nvme_layout). Empty for a layout an earlier ferry staged.
  std::string layout_id;
  std::vector<LayoutBinding> bindings;
  std::string file_name;
  std::uint64_t stripe_bytes = 0;
  // An engine adopted the layout and updates it in place: contents no longer match checksums.
  bool live = false;
  std::vector<LayoutBundle> bundles;  // in the order the store added them

  const LayoutBundle* find(const std::string& name) const;  // nullptr when absent
};

// Reads a manifest; throws ferry::Error naming the file and the bad field.
NvmeLayout read_nvme_layout(const std::string& path);
// Writes a manifest durably through `env` (nullptr: Env::posix()): "<path>.tmp", fdatasync,
// rename, fsync of the directory. The directories are recorded relative to the manifest's.
void write_nvme_layout(const NvmeLayout& layout, const std::string& path, Env* env = nullptr);
// Gives the layout a new random id and binds it to where its directories and files are now.
void bind_nvme_layout(NvmeLayout& layout);
// Empty when the layout's directories and files are the ones it was bound to; else what differs
// (it is a copy, or was restored from a backup, or an earlier ferry staged it unbound).
std::string nvme_layout_binding_mismatch(const NvmeLayout& layout);
// The XXH64 of each kLayoutChunkBytes of `bytes` bytes at `data` (LayoutBundle::chunk_checksums).
std::vector<std::uint64_t> chunk_checksums(const void* data, std::uint64_t bytes);

}  // namespace ferry
