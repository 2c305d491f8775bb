#include "ferry/store.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <mutex>
#include <optional>
#include <set>
#include <vector>

#include "store/device_copy.h"
#include "store/extent_allocator.h"
#include "store/fence.h"
#include "ferry/fs.h"
#include "ferry/lock.h"

namespace ferry {

const char* to_string(Tier tier) {
  switch (tier) {
    case Tier::kGpu: return "gpu";
    case Tier::kHost: return "host";
    case Tier::kNvme: return "nvme";
  }
  return "unknown tier";
}

const char* to_string(CopyState state) {
  switch (state) {
    case CopyState::kAbsent: return "absent";
    case CopyState::kLoading: return "loading";
    case CopyState::kReady: return "ready";
    case CopyState::kDirty: return "dirty";
    case CopyState::kWritingBack: return "writing back";
  }
  return "unknown state";
}

namespace {

using Clock = std::chrono::steady_clock;

constexpr Tier kTiers[kTierCount] = {Tier::kGpu, Tier::kHost, Tier::kNvme};
constexpr std::uint64_t kMaxHostChunkBytes = std::uint64_t{256} << 20;
constexpr double kYearSeconds = 365.0 * 24 * 3600;

int index(Tier tier) { return static_cast<int>(tier); }

// Note: directory locks are shared within a process (ferry/lock.h), so they cannot tell two
// stores of one process on one file apart, and the second would overwrite the first's data. This
// process-wide list of the store files open does.
class StoreFileClaim {
 public:
  explicit StoreFileClaim(std::string path) : path_(std::move(path)) {
    std::lock_guard<std::mutex> lock(mutex());
    FERRY_CHECK(open_files().insert(path_).second, "NVMe store file ", path_,
                " is open in another engine of this process: give each engine its own NVMe directories");
  }
  ~StoreFileClaim() {
    std::lock_guard<std::mutex> lock(mutex());
    open_files().erase(path_);
  }
  StoreFileClaim(const StoreFileClaim&) = delete;
  StoreFileClaim& operator=(const StoreFileClaim&) = delete;

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static std::set<std::string>& open_files() {
    static std::set<std::string> files;
    return files;
  }
  const std::string path_;
};

std::uint64_t round_up(std::uint64_t bytes) {
  return (bytes + kIoAlignment - 1) / kIoAlignment * kIoAlignment;
}

bool in_flight(CopyState state) {
  return state == CopyState::kLoading || state == CopyState::kWritingBack;
}

void check_tier(Tier tier) {
  FERRY_CHECK(tier == Tier::kGpu || tier == Tier::kHost || tier == Tier::kNvme, "tier ",
              static_cast<int>(tier), " is not a tier: use Tier::kGpu, Tier::kHost or Tier::kNvme");
}

// How long a request may wait for other threads to free room in a tier.
class BudgetWait {
 public:
  // Waits longer than a year are clamped to one, so the deadline cannot overflow.
  explicit BudgetWait(double seconds)
      : start_(Clock::now()),
        deadline_(start_ + std::chrono::duration_cast<Clock::duration>(
                               std::chrono::duration<double>(std::min(seconds, kYearSeconds)))) {}
  Clock::time_point deadline() const { return deadline_; }
  double waited_seconds() const {
    return std::chrono::duration<double>(Clock::now() - start_).count();
  }

 private:
  Clock::time_point start_;
  Clock::time_point deadline_;
};

// GPU <-> host and host <-> NVMe are one hop; GPU <-> NVMe stages through the host.
bool adjacent(Tier a, Tier b) { return std::abs(index(a) - index(b)) == 1; }

class SynchronousCopier final : public detail::DeviceCopier {
 public:
  explicit SynchronousCopier(torch::Device device) : device_(device) {}

  torch::Device device() const override { return device_; }
  torch::Tensor allocate(std::int64_t bytes) override {
    return torch::empty({bytes}, torch::TensorOptions().dtype(torch::kUInt8).device(device_));
  }
  void retire(const torch::Tensor&) override {}
  std::shared_ptr<detail::DeviceEvent> record_current_stream() override { return nullptr; }
  std::shared_ptr<detail::DeviceEvent> copy(torch::Tensor destination, const torch::Tensor& source,
                                            detail::DeviceEvent* after,
                                            std::function<void()> done) override {
    destination.copy_(source);
    done();
    return nullptr;
  }

 private:
  torch::Device device_;
};

// One copy of a bundle on one tier.
struct Copy {
  CopyState state = CopyState::kAbsent;
  // The bundle version the contents hold (0: none). A copy is up to date when it is kReady,
  // kDirty or kWritingBack and holds the bundle's current version.
  std::uint64_t version = 0;
  int readers = 0;  // transfers reading from this copy
  std::shared_ptr<detail::FenceState> loading;  // the transfer into this copy, while kLoading
  torch::Tensor gpu;                            // kGpu: storage_bytes of uint8
  HostBlock host;                               // kHost
  std::uint64_t nvme_offset = 0;                // kNvme: the extent in the store's file
  bool reads_as_zeros = false;  // kNvme: never written since add(), so it reads as zeros
  PoolId pool = kNoPool;        // where its bytes are counted: a pool, or its tier
};

struct Pool {
  std::string name;
  Tier tier;
  std::uint64_t bytes;
  std::uint64_t used = 0;
  std::uint64_t peak = 0;
  bool released = false;
};

struct Bundle {
  BundleId id = 0;
  BundleSpec spec;
  std::uint64_t storage_bytes = 0;  // spec.bytes rounded up to 4096
  std::uint64_t version = 1;        // raised by mark_dirty
  Copy copies[kTierCount];

  Copy& at(Tier tier) { return copies[index(tier)]; }
  const Copy& at(Tier tier) const { return copies[index(tier)]; }
  bool up_to_date(Tier tier) const {
    const Copy& copy = at(tier);
    return (copy.state == CopyState::kReady || copy.state == CopyState::kDirty ||
            copy.state == CopyState::kWritingBack) &&
           copy.version == version;
  }
};

std::string describe(const Bundle& bundle, Tier tier) {
  return detail::concat("the ", to_string(tier), " copy of bundle '", bundle.spec.name, "' (id ",
                        bundle.id, ")");
}

// One fetch or write-back: one hop from route[0] to route[1], or two when it stages through
// the host (route[1]) between the GPU and NVMe.
struct Transfer {
  Transfer(Bundle* bundle_in, Tier from, Tier to, bool write_back_in)
      : bundle(bundle_in),
        route{from, adjacent(from, to) ? to : Tier::kHost, to},
        hops(adjacent(from, to) ? 1 : 2),
        write_back(write_back_in) {}

  Bundle* bundle;
  Tier route[3];
  int hops;
  std::shared_ptr<detail::FenceState> fence;
  std::shared_ptr<detail::DeviceEvent> after;  // the requesting stream, for device copies
  Clock::time_point hop_start;                  // of the hop in progress, for on_transfer
  // A write-back keeps its origin kWritingBack until the last hop ends, then restores this.
  bool write_back;
  CopyState origin_state = CopyState::kReady;
  // Per tier: whether this transfer allocated the copy (it frees it again if it fails), and the
  // state and version an existing copy had before.
  bool allocated[kTierCount] = {};
  CopyState previous_state[kTierCount] = {};
  std::uint64_t previous_version[kTierCount] = {};
};

}  // namespace

namespace detail {

std::unique_ptr<DeviceCopier> make_device_copier(torch::Device device) {
#if FERRY_WITH_CUDA
  if (device.is_cuda()) return make_cuda_copier(device);
#endif
  FERRY_CHECK(device.is_cpu(), "the store's GPU tier cannot use device ", device,
              ": this build of ferry has no CUDA; use torch::kCPU, or a CUDA build of LibTorch");
  return std::make_unique<SynchronousCopier>(device);
}

}  // namespace detail

// Note: lock ordering and where transitions happen. `mutex` guards every bundle's copies, the
// tier accounting and the extent allocator. It is never held while calling into the I/O engine
// (whose callbacks may run inside read()/write() on the calling thread), the device copier, or
// while creating or destroying GPU memory; those run between a transfer's start under the lock
// and its completion under the lock. A transfer's state transitions are applied eagerly on
// completion, under `mutex`, by whichever thread learns of it: the I/O engine's completion
// thread for NVMe hops, the CUDA copier's completion thread for device copies, or the calling
// thread for synchronous copies. So the second hop of an NVMe -> GPU fetch is issued from the
// I/O completion callback (with CUDA only queued there: the copy runs on the copy stream), and
// the second hop of a GPU -> NVMe write-back is submitted from the device copy's completion.
// FenceState's mutex and the host arena's (which registers chunks with the I/O engine) rank
// below `mutex`.
struct Store::Impl {
  explicit Impl(const StoreOptions& options);

  Bundle& bundle_locked(BundleId id);
  // Allocates the memory of `tier`'s copy; false when the tier's budget cannot hold it now.
  // `nvme_at` places an NVMe copy at that offset of the file (a kept layout) instead of first fit.
  bool allocate_locked(Bundle& bundle, Tier tier, std::optional<std::uint64_t> nvme_at = std::nullopt);
  // Allocates each absent copy the transfer writes into, noting them in transfer.allocated;
  // returns the first tier that had no room (after undoing the others), or nullopt.
  std::optional<Tier> allocate_absent_locked(Transfer& transfer);
  // Frees `tier`'s copy. A GPU tensor moves to `released` so it is destroyed after unlocking.
  void free_locked(Bundle& bundle, Tier tier, torch::Tensor* released);
  // Waits for a tier to free memory; false when the wait is over.
  bool wait_for_room(std::unique_lock<std::mutex>& lock, const BudgetWait& wait);
  // The pool `tier`'s copy of the bundle draws from: none for the home copy.
  PoolId pool_of(const Bundle& bundle, Tier tier) const {
    return tier == bundle.spec.home ? kNoPool : bundle.spec.pools[index(tier)];
  }
  BudgetExceeded budget_exceeded_locked(Tier tier, PoolId pool, const std::string& request,
                                        std::uint64_t bytes, const BudgetWait& wait);
  void check_movable() const;
  void check_tier_configured(const Bundle& bundle, Tier tier) const;

  // Allocates the copies that the route from `from` to `to` lacks and starts the transfer. When
  // a tier has no room it waits for some and returns nullopt, for the caller to plan again (the
  // bundle may have changed meanwhile); once the wait is over it throws BudgetExceeded.
  std::optional<Fence> try_start(std::unique_lock<std::mutex>& lock, Bundle& bundle, Tier from,
                                 Tier to, bool write_back, const BudgetWait& wait);
  // Claims the copies along the route and counts the transfer in flight.
  void begin_locked(Transfer& transfer);
  // Creates GPU memory for copies the transfer allocated and starts its first hop.
  void launch(const std::shared_ptr<Transfer>& transfer);
  void run_hop(const std::shared_ptr<Transfer>& transfer, int hop);
  // Applies the end of one hop and starts the next. Never throws: it runs on completion threads,
  // and a transfer must finish exactly once.
  void finish_hop(const std::shared_ptr<Transfer>& transfer, int hop, std::exception_ptr error,
                  std::uint64_t moved_bytes) noexcept;
  // Undoes the claim on a copy the transfer did not fill. `touched`: a failed hop wrote into it,
  // so its contents are garbage: it is freed, or, for the home copy, left stale.
  void abandon_locked(Transfer& transfer, Tier tier, bool touched, torch::Tensor* released);
  torch::Tensor storage(Bundle& bundle, Tier tier);

  void synchronize();

  const StoreOptions options;
  std::unique_ptr<detail::DeviceCopier> copier;
  std::shared_ptr<detail::TransferCounters> counters = std::make_shared<detail::TransferCounters>();
  // One per NVMe directory, held while the store lives: released after the file below is closed.
  std::vector<std::unique_ptr<StoreFileClaim>> claims;
  std::vector<DirectoryLock> locks;
  std::unique_ptr<IoEngine> io;      // null without NVMe directories
  std::unique_ptr<StripedFile> file;  // the NVMe tier's one file
  std::unique_ptr<HostArena> arena;  // null with a zero host budget
  std::uint64_t budget_bytes[kTierCount] = {};
  std::atomic<std::uint64_t> used_bytes[kTierCount] = {};
  std::atomic<std::uint64_t> peak_bytes[kTierCount] = {};
  std::atomic<std::uint64_t> refusals[kTierCount] = {};

  mutable std::mutex mutex;
  std::condition_variable room;  // a tier freed memory
  std::condition_variable idle;  // the last transfer in flight ended
  int transfers_in_flight = 0;
  std::unique_ptr<detail::ExtentAllocator> extents;
  std::vector<std::unique_ptr<Bundle>> bundles;
  std::vector<Pool> pools;
};

Store::Impl::Impl(const StoreOptions& options_in) : options(options_in) {
  budget_bytes[index(Tier::kGpu)] = options.gpu_budget_bytes;
  budget_bytes[index(Tier::kHost)] = options.host_budget_bytes;
  if (options.count_only) {
    if (!options.nvme_directories.empty()) budget_bytes[index(Tier::kNvme)] = options.nvme_budget_bytes;
    return;
  }
  copier = detail::make_device_copier(options.device);
  if (!options.nvme_directories.empty()) {
    FERRY_CHECK(options.stripe_bytes > 0 && options.stripe_bytes % kIoAlignment == 0,
                "store stripe size ", options.stripe_bytes,
                " bytes is invalid: use a positive multiple of 4096");
    Env& env = options.env != nullptr ? *options.env : Env::posix();
    // Note: the lock is the store file's, not the directory's, so that the ranks of one job (each
    // with its own file, docs/distributed.md) share a directory while two jobs cannot.
    for (const std::string& directory : options.nvme_directories) {
      fs::make_directories(directory);
      claims.push_back(std::make_unique<StoreFileClaim>(fs::absolute_path(directory) + "/" + options.nvme_file_name));
      locks.push_back(DirectoryLock::acquire_beside(directory + "/" + options.nvme_file_name, "NVMe store file", &env));
    }
    io = IoEngine::create(options.io);
    file = StripedFile::open(env, options.nvme_directories, options.nvme_file_name,
                             OpenMode::kCreate, options.stripe_bytes, options.io.direct_io);
    // Note: announced once per store in every front end, as the I/O backend is: without O_DIRECT
    // the NVMe tier's traffic goes through the page cache and costs host memory besides.
    for (const std::string& directory : options.nvme_directories) {
      if (options.io.direct_io && !supports_direct_io(directory)) {
        std::cerr << "[ferry] NVMe directory " << directory << ": its filesystem has no O_DIRECT (tmpfs, ramfs?): "
                  << "buffered I/O through the page cache\n";
      }
    }
    budget_bytes[index(Tier::kNvme)] = options.nvme_budget_bytes;
  }
  if (options.host_budget_bytes > 0) {
    HostArenaOptions arena_options;
    arena_options.budget_bytes = options.host_budget_bytes;
    arena_options.chunk_bytes = round_up(std::min(kMaxHostChunkBytes, options.host_budget_bytes));
    arena = std::make_unique<HostArena>(arena_options, io.get());
  }
  extents = std::make_unique<detail::ExtentAllocator>(budget_bytes[index(Tier::kNvme)]);
}

Bundle& Store::Impl::bundle_locked(BundleId id) {
  FERRY_CHECK(id < bundles.size(), "unknown BundleId ", id, ": the store holds ", bundles.size(),
              " bundles", bundles.empty() ? "" : detail::concat(" (ids 0 to ", bundles.size() - 1, ")"));
  FERRY_CHECK(bundles[id] != nullptr, "BundleId ", id, " was removed from the store");
  return *bundles[id];
}

void Store::Impl::check_tier_configured(const Bundle& bundle, Tier tier) const {
  check_tier(tier);
  FERRY_CHECK(tier != Tier::kNvme || file != nullptr || (options.count_only && !options.nvme_directories.empty()),
              "bundle '", bundle.spec.name,
              "' needs the nvme tier, but StoreOptions::nvme_directories is empty: give the "
              "store at least one directory for its NVMe file");
}

void Store::Impl::check_movable() const {
  FERRY_CHECK(!options.count_only, "a counting store (StoreOptions::count_only) holds no memory and moves "
              "nothing: only add, adopt and reserve count");
}

bool Store::Impl::allocate_locked(Bundle& bundle, Tier tier, std::optional<std::uint64_t> nvme_at) {
  int t = index(tier);
  std::uint64_t bytes = bundle.storage_bytes;
  const PoolId pool = pool_of(bundle, tier);
  if (pool != kNoPool) {
    if (pools[pool].used + bytes > pools[pool].bytes) return false;
  } else if (used_bytes[t].load() + bytes > budget_bytes[t]) {
    return false;
  }
  Copy& copy = bundle.at(tier);
  if (options.count_only) {
    // Nothing to place: the bytes are what counts.
  } else switch (tier) {
    case Tier::kGpu:
      break;  // the tensor is created by the requesting thread, outside the lock
    case Tier::kHost:
      copy.host = arena->try_allocate(bytes);
      if (!copy.host) return false;
      break;
    case Tier::kNvme: {
      std::optional<std::uint64_t> offset = nvme_at;
      if (!nvme_at) offset = extents->allocate(bytes);
      if (!offset || (nvme_at && !extents->allocate_at(*nvme_at, bytes))) return false;
      copy.nvme_offset = *offset;
      copy.reads_as_zeros = false;
      break;
    }
  }
  copy.pool = pool;
  if (pool != kNoPool) {
    Pool& drawn = pools[pool];
    drawn.used += bytes;
    drawn.peak = std::max(drawn.peak, drawn.used);
    return true;
  }
  std::uint64_t used = used_bytes[t].fetch_add(bytes) + bytes;
  if (used > peak_bytes[t].load()) peak_bytes[t].store(used);
  return true;
}

std::optional<Tier> Store::Impl::allocate_absent_locked(Transfer& transfer) {
  Bundle& bundle = *transfer.bundle;
  for (int hop = 1; hop <= transfer.hops; ++hop) {
    Tier tier = transfer.route[hop];
    if (bundle.at(tier).state != CopyState::kAbsent) continue;
    if (!allocate_locked(bundle, tier)) {
      for (Tier undo : kTiers) {
        if (!transfer.allocated[index(undo)]) continue;
        torch::Tensor unused;  // GPU memory is created only once the transfer starts
        free_locked(bundle, undo, &unused);
        transfer.allocated[index(undo)] = false;
      }
      return tier;
    }
    transfer.allocated[index(tier)] = true;
  }
  return std::nullopt;
}

void Store::Impl::free_locked(Bundle& bundle, Tier tier, torch::Tensor* released) {
  Copy& copy = bundle.at(tier);
  FERRY_ASSERT(copy.readers == 0, "freed ", describe(bundle, tier), " while it is read");
  switch (tier) {
    case Tier::kGpu: *released = std::move(copy.gpu); break;
    case Tier::kHost: copy.host.reset(); break;
    case Tier::kNvme:
      if (!options.count_only) extents->free(copy.nvme_offset, bundle.storage_bytes);
      copy.reads_as_zeros = false;
      break;
  }
  if (copy.pool != kNoPool) {
    pools[copy.pool].used -= bundle.storage_bytes;
  } else {
    used_bytes[index(tier)].fetch_sub(bundle.storage_bytes);
  }
  copy.pool = kNoPool;
  copy.state = CopyState::kAbsent;
  copy.version = 0;
  copy.loading = nullptr;
  room.notify_all();
}

bool Store::Impl::wait_for_room(std::unique_lock<std::mutex>& lock, const BudgetWait& wait) {
  if (Clock::now() >= wait.deadline()) return false;
  room.wait_until(lock, wait.deadline());
  return true;
}

BudgetExceeded Store::Impl::budget_exceeded_locked(Tier tier, PoolId pool, const std::string& request,
                                                   std::uint64_t bytes, const BudgetWait& wait) {
  double waited_seconds = wait.waited_seconds();
  int t = index(tier);
  refusals[t].fetch_add(1);
  if (pool != kNoPool) {
    const Pool& full = pools[pool];
    return BudgetExceeded(detail::concat(
        "the ", to_string(tier), " pool '", full.name, "' (", format_bytes(full.bytes), " set aside): ",
        format_bytes(full.used), " in use, ", request, " needs ", format_bytes(bytes),
        waited_seconds > 0 ? detail::concat(" after waiting ", waited_seconds, " s for evictions") : std::string(),
        "; the set-up that reserved the pool sized it for fewer copies at once than this step holds"));
  }
  std::uint64_t used = used_bytes[t].load();
  std::uint64_t budget = budget_bytes[t];
  std::string why =
      used + bytes > budget
          ? detail::concat(format_bytes(used + bytes - budget), " short")
          : detail::concat(format_bytes(budget - used), " are free but no free range is that large");
  std::string waited =
      waited_seconds > 0 ? detail::concat(" after waiting ", waited_seconds, " s for evictions") : "";
  return BudgetExceeded(detail::concat(
      to_string(tier), " budget ", format_bytes(budget), ": ", format_bytes(used), " in use, ",
      request, " needs ", format_bytes(bytes), ", ", why, waited, "; raise the ", to_string(tier),
      " budget (StoreOptions::", to_string(tier), "_budget_bytes) or evict other bundles from the ",
      to_string(tier), " tier first"));
}

void Store::Impl::begin_locked(Transfer& transfer) {
  Bundle& bundle = *transfer.bundle;
  transfer.fence =
      std::make_shared<detail::FenceState>(counters, transfer.route[0], transfer.route[1]);
  for (int hop = 1; hop <= transfer.hops; ++hop) {
    Tier tier = transfer.route[hop];
    Copy& copy = bundle.at(tier);
    transfer.previous_state[index(tier)] = copy.state;
    transfer.previous_version[index(tier)] = copy.version;
    copy.state = CopyState::kLoading;
    copy.version = bundle.version;
    copy.loading = transfer.fence;
  }
  Copy& origin = bundle.at(transfer.route[0]);
  if (transfer.write_back) {
    transfer.origin_state = origin.state;
    origin.state = CopyState::kWritingBack;
  }
  ++origin.readers;
  ++transfers_in_flight;
}

std::optional<Fence> Store::Impl::try_start(std::unique_lock<std::mutex>& lock, Bundle& bundle,
                                            Tier from, Tier to, bool write_back,
                                            const BudgetWait& wait) {
  auto transfer = std::make_shared<Transfer>(&bundle, from, to, write_back);
  if (transfer->hops == 2) {
    const Copy& staging = bundle.at(Tier::kHost);
    FERRY_CHECK(!in_flight(staging.state) && staging.readers == 0, "cannot move bundle '",
                bundle.spec.name, "' from ", to_string(from), " to ", to_string(to),
                " through ", describe(bundle, Tier::kHost), ": it is ", to_string(staging.state),
                " with a transfer in flight; wait for its Fence first");
  }
  if (std::optional<Tier> short_tier = allocate_absent_locked(*transfer)) {
    if (wait_for_room(lock, wait)) return std::nullopt;
    throw budget_exceeded_locked(
        *short_tier, pool_of(bundle, *short_tier),
        detail::concat(write_back ? "the write-back of " : "the fetch of ", bundle.spec.name,
                       " to ", to_string(to)),
        bundle.storage_bytes, wait);
  }
  begin_locked(*transfer);
  lock.unlock();
  launch(transfer);
  return Fence(transfer->fence);
}

void Store::Impl::launch(const std::shared_ptr<Transfer>& transfer) {
  Bundle& bundle = *transfer->bundle;
  try {
    const bool fresh_gpu_copy = transfer->allocated[index(Tier::kGpu)];
    if (fresh_gpu_copy) {
      torch::Tensor memory = copier->allocate(static_cast<std::int64_t>(bundle.storage_bytes));
      std::lock_guard<std::mutex> lock(mutex);
      bundle.at(Tier::kGpu).gpu = std::move(memory);
    }
    if (transfer->route[0] == Tier::kGpu ||
        (transfer->route[transfer->hops] == Tier::kGpu && !fresh_gpu_copy)) {
      transfer->after = copier->record_current_stream();
    }
  } catch (...) {
    transfer->fence->begin_hop(0, transfer->route[0], transfer->route[1]);
    counters->begin(transfer->route[0], transfer->route[1]);
    transfer->hop_start = Clock::now();
    finish_hop(transfer, 0, std::current_exception(), 0);
    return;
  }
  run_hop(transfer, 0);
}

torch::Tensor Store::Impl::storage(Bundle& bundle, Tier tier) {
  Copy& copy = bundle.at(tier);
  if (tier == Tier::kGpu) return copy.gpu;
  return torch::from_blob(copy.host.data(), {static_cast<std::int64_t>(bundle.storage_bytes)},
                          torch::TensorOptions().dtype(torch::kUInt8));
}

// Runs without the lock: the copies on this hop are claimed (kLoading, or read-pinned), so no
// other thread changes their memory.
void Store::Impl::run_hop(const std::shared_ptr<Transfer>& transfer, int hop) {
  Bundle& bundle = *transfer->bundle;
  Tier from = transfer->route[hop];
  Tier to = transfer->route[hop + 1];
  Copy& source = bundle.at(from);
  Copy& destination = bundle.at(to);
  std::uint64_t bytes = bundle.storage_bytes;
  transfer->fence->begin_hop(hop, from, to);
  counters->begin(from, to);
  transfer->hop_start = Clock::now();
  try {
    if (from == Tier::kNvme && source.reads_as_zeros) {
      std::memset(destination.host.data(), 0, bytes);
      finish_hop(transfer, hop, nullptr, 0);
    } else if (from == Tier::kNvme || to == Tier::kNvme) {
      auto done = [this, transfer, hop, bytes](const IoError* error) {
        finish_hop(transfer, hop, error ? std::make_exception_ptr(IoException(*error)) : nullptr,
                   bytes);
      };
      if (from == Tier::kNvme) {
        io->read(*file, source.nvme_offset, destination.host.data(), bytes, done);
      } else {
        io->write(*file, destination.nvme_offset, source.host.data(), bytes, done);
      }
    } else {
      std::shared_ptr<detail::DeviceEvent> copied = copier->copy(
          storage(bundle, to), storage(bundle, from), transfer->after.get(),
          [this, transfer, hop, bytes] { finish_hop(transfer, hop, nullptr, bytes); });
      if (copied) transfer->fence->set_device_event(hop, std::move(copied));
    }
  } catch (...) {
    finish_hop(transfer, hop, std::current_exception(), 0);
  }
}

void Store::Impl::abandon_locked(Transfer& transfer, Tier tier, bool touched,
                                 torch::Tensor* released) {
  Bundle& bundle = *transfer.bundle;
  Copy& copy = bundle.at(tier);
  if (transfer.allocated[index(tier)] || (touched && tier != bundle.spec.home)) {
    free_locked(bundle, tier, released);
    return;
  }
  copy.loading = nullptr;
  copy.state = touched ? CopyState::kReady : transfer.previous_state[index(tier)];
  copy.version = touched ? 0 : transfer.previous_version[index(tier)];
  if (touched && tier == Tier::kNvme) copy.reads_as_zeros = false;
}

void Store::Impl::finish_hop(const std::shared_ptr<Transfer>& transfer, int hop,
                             std::exception_ptr error, std::uint64_t moved_bytes) noexcept {
  Tier from = transfer->route[hop];
  Tier to = transfer->route[hop + 1];
  counters->end(from, to, error ? 0 : moved_bytes);
  if (options.on_transfer) {
    try {
      options.on_transfer({transfer->bundle->spec.name, from, to, error ? 0 : moved_bytes,
                           transfer->hop_start, Clock::now()});
    } catch (...) {
    }
  }
  torch::Tensor released[kTierCount];
  bool next_hop = false;
  {
    std::lock_guard<std::mutex> lock(mutex);
    Bundle& bundle = *transfer->bundle;
    --bundle.at(from).readers;
    if (error) {
      for (int later = hop + 1; later <= transfer->hops; ++later) {
        Tier tier = transfer->route[later];
        abandon_locked(*transfer, tier, later == hop + 1, &released[index(tier)]);
      }
    } else {
      Copy& destination = bundle.at(to);
      destination.state = CopyState::kReady;
      destination.loading = nullptr;
      if (to == Tier::kNvme) destination.reads_as_zeros = false;
      next_hop = hop + 1 < transfer->hops;
      if (next_hop) ++destination.readers;
    }
    if (!next_hop) {
      if (transfer->write_back) {
        bundle.at(transfer->route[0]).state = error ? transfer->origin_state : CopyState::kReady;
      }
      transfer->fence->complete(error);
      if (--transfers_in_flight == 0) idle.notify_all();
    }
  }
  if (next_hop) run_hop(transfer, hop + 1);
}

void Store::Impl::synchronize() {
  std::unique_lock<std::mutex> lock(mutex);
  idle.wait(lock, [this] { return transfers_in_flight == 0; });
}

// ---------------------------------------------------------------------------------------------

Store::Store(StoreOptions options)
    : options_(std::move(options)), impl_(std::make_unique<Impl>(options_)) {}

Store::~Store() {
  impl_->synchronize();
  // The last completion callbacks may still be returning.
  if (impl_->io) impl_->io->drain();
}

BundleId Store::add(const BundleSpec& spec) { return insert(spec, std::nullopt, false); }

BundleId Store::adopt(const BundleSpec& spec, std::uint64_t nvme_offset, bool holds_data) {
  FERRY_CHECK(spec.home == Tier::kNvme, "bundle '", spec.name, "' has home ", to_string(spec.home),
              ": only a bundle at home on nvme can be adopted from a kept layout");
  return insert(spec, nvme_offset, holds_data);
}

BundleId Store::insert(const BundleSpec& spec, std::optional<std::uint64_t> nvme_offset,
                       bool holds_data) {
  auto bundle = std::make_unique<Bundle>();
  bundle->spec = spec;
  bundle->storage_bytes = round_up(spec.bytes);
  FERRY_CHECK(spec.bytes > 0, "bundle '", spec.name, "' has 0 bytes: a bundle needs at least 1 byte");
  impl_->check_tier_configured(*bundle, spec.home);
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    for (Tier tier : kTiers) {
      const PoolId pool = spec.pools[index(tier)];
      if (pool == kNoPool) continue;
      FERRY_CHECK(pool < impl_->pools.size() && !impl_->pools[pool].released && impl_->pools[pool].tier == tier,
                  "bundle '", spec.name, "' names pool ", pool, " for its ", to_string(tier),
                  " copies, which is not a live pool of that tier (Store::reserve)");
    }
  }
  Tier home = spec.home;
  Copy& copy = bundle->at(home);
  if (nvme_offset) {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    FERRY_CHECK(impl_->allocate_locked(*bundle, home, nvme_offset), "cannot adopt bundle '",
                spec.name, "' at NVMe offset ", *nvme_offset, " (", bundle->storage_bytes,
                " bytes): the extent is not 4096-aligned, overlaps another bundle or passes the "
                "NVMe budget of ", format_bytes(impl_->budget_bytes[index(Tier::kNvme)]),
                "; the kept layout does not fit this store");
  } else {
    BudgetWait wait(options_.budget_wait_seconds);
    std::unique_lock<std::mutex> lock(impl_->mutex);
    while (!impl_->allocate_locked(*bundle, home)) {
      if (!impl_->wait_for_room(lock, wait)) {
        throw impl_->budget_exceeded_locked(home, kNoPool, detail::concat("adding bundle '", spec.name, "'"),
                                            bundle->storage_bytes, wait);
      }
    }
  }
  try {
    if (!options_.count_only) switch (home) {
      case Tier::kGpu:
        copy.gpu = impl_->copier->allocate(static_cast<std::int64_t>(bundle->storage_bytes)).zero_();
        break;
      case Tier::kHost: std::memset(copy.host.data(), 0, bundle->storage_bytes); break;
      case Tier::kNvme: copy.reads_as_zeros = !holds_data; break;
    }
  } catch (...) {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    torch::Tensor released;
    impl_->free_locked(*bundle, home, &released);
    throw;
  }
  copy.state = CopyState::kReady;
  copy.version = bundle->version;
  std::lock_guard<std::mutex> lock(impl_->mutex);
  bundle->id = static_cast<BundleId>(impl_->bundles.size());
  impl_->bundles.push_back(std::move(bundle));
  return impl_->bundles.back()->id;
}

PoolId Store::reserve(Tier tier, std::uint64_t bytes, const std::string& name) {
  check_tier(tier);
  const std::uint64_t rounded = round_up(bytes);
  std::lock_guard<std::mutex> lock(impl_->mutex);
  const int t = index(tier);
  const std::uint64_t used = impl_->used_bytes[t].load();
  if (used + rounded > impl_->budget_bytes[t]) {
    impl_->refusals[t].fetch_add(1);
    throw BudgetExceeded(detail::concat(
        to_string(tier), " budget ", format_bytes(impl_->budget_bytes[t]), ": ", format_bytes(used),
        " in use, the pool '", name, "' needs ", format_bytes(rounded), ", ",
        format_bytes(used + rounded - impl_->budget_bytes[t]), " short; raise the ", to_string(tier), " budget"));
  }
  const std::uint64_t now = impl_->used_bytes[t].fetch_add(rounded) + rounded;
  if (now > impl_->peak_bytes[t].load()) impl_->peak_bytes[t].store(now);
  impl_->pools.push_back({name, tier, rounded});
  return static_cast<PoolId>(impl_->pools.size() - 1);
}

void Store::release(PoolId id) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  FERRY_CHECK(id < impl_->pools.size() && !impl_->pools[id].released, "pool ", id, " is not a live pool");
  Pool& pool = impl_->pools[id];
  FERRY_CHECK(pool.used == 0, "cannot release the pool '", pool.name, "': copies of ", format_bytes(pool.used),
              " still draw from it; drop them first");
  pool.released = true;
  impl_->used_bytes[index(pool.tier)].fetch_sub(pool.bytes);
  impl_->room.notify_all();
}

std::uint64_t Store::nvme_offset(BundleId id) const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  const Bundle& bundle = impl_->bundle_locked(id);
  FERRY_CHECK(bundle.at(Tier::kNvme).state != CopyState::kAbsent, "bundle '", bundle.spec.name,
              "' (id ", id, ") has no nvme copy, so no NVMe offset");
  return bundle.at(Tier::kNvme).nvme_offset;
}

void Store::sync_nvme() {
  if (impl_->file) impl_->file->sync();
}

const BundleSpec& Store::spec(BundleId id) const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->bundle_locked(id).spec;
}

std::size_t Store::size() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->bundles.size();
}

CopyState Store::state(BundleId id, Tier tier) const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  Bundle& bundle = impl_->bundle_locked(id);
  check_tier(tier);
  return bundle.at(tier).state;
}

bool Store::up_to_date(BundleId id, Tier tier) const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  Bundle& bundle = impl_->bundle_locked(id);
  check_tier(tier);
  return bundle.up_to_date(tier);
}

torch::Tensor Store::tensor(BundleId id, Tier tier) const {
  impl_->check_movable();
  std::lock_guard<std::mutex> lock(impl_->mutex);
  Bundle& bundle = impl_->bundle_locked(id);
  FERRY_CHECK(tier == Tier::kGpu || tier == Tier::kHost, "no tensor for ",
              describe(bundle, tier), ": only gpu and host copies are memory; fetch it first");
  const Copy& copy = bundle.at(tier);
  FERRY_CHECK(copy.state == CopyState::kReady || copy.state == CopyState::kDirty, "no tensor for ",
              describe(bundle, tier), ": it is ", to_string(copy.state),
              copy.state == CopyState::kAbsent ? "; fetch it first" : "; wait for its Fence first");
  auto bytes = static_cast<std::int64_t>(bundle.spec.bytes);
  if (tier == Tier::kGpu) return copy.gpu.narrow(0, 0, bytes);
  return torch::from_blob(copy.host.data(), {bytes}, torch::TensorOptions().dtype(torch::kUInt8));
}

torch::Tensor Store::device_tensor_in_flight(BundleId id) const {
  impl_->check_movable();
  std::lock_guard<std::mutex> lock(impl_->mutex);
  Bundle& bundle = impl_->bundle_locked(id);
  const Copy& copy = bundle.at(Tier::kGpu);
  FERRY_CHECK(copy.state == CopyState::kLoading || copy.state == CopyState::kReady ||
                  copy.state == CopyState::kDirty,
              "no device tensor for ", describe(bundle, Tier::kGpu), ": it is ", to_string(copy.state));
  FERRY_CHECK(copy.gpu.defined(), "no device tensor for ", describe(bundle, Tier::kGpu),
              ": its memory is not allocated yet");
  return copy.gpu.narrow(0, 0, static_cast<std::int64_t>(bundle.spec.bytes));
}

Fence Store::fetch(BundleId id, Tier to) {
  impl_->check_movable();
  BudgetWait wait(options_.budget_wait_seconds);
  std::unique_lock<std::mutex> lock(impl_->mutex);
  for (;;) {
    Bundle& bundle = impl_->bundle_locked(id);
    impl_->check_tier_configured(bundle, to);
    Copy& target = bundle.at(to);
    if (target.state == CopyState::kLoading && target.version == bundle.version) {
      return Fence(target.loading);
    }
    FERRY_CHECK(!in_flight(target.state) && target.readers == 0, "cannot fetch into ",
                describe(bundle, to), ": it is ", to_string(target.state),
                " with a transfer in flight; wait for its Fence first");
    if (bundle.up_to_date(to)) return Fence();

    // The nearest up-to-date copy: GPU and NVMe prefer the host, the host prefers the GPU.
    const Tier preference[kTierCount][2] = {
        {Tier::kHost, Tier::kNvme}, {Tier::kGpu, Tier::kNvme}, {Tier::kHost, Tier::kGpu}};
    const Tier* candidates = preference[index(to)];
    Copy& nearest = bundle.at(candidates[0]);
    if (nearest.state == CopyState::kLoading && nearest.version == bundle.version) {
      // It is on its way: wait for it rather than reading from further away.
      Fence arriving(nearest.loading);
      lock.unlock();
      try {
        arriving.wait();
      } catch (const std::exception&) {
        // That transfer's own caller sees its error; this fetch plans again without it.
      }
      lock.lock();
      continue;
    }
    Tier source = bundle.up_to_date(candidates[0]) ? candidates[0] : candidates[1];
    FERRY_ASSERT(bundle.up_to_date(source), "bundle '", bundle.spec.name,
                 "' has no up-to-date copy to fetch ", to_string(to), " from");
    if (std::optional<Fence> started = impl_->try_start(lock, bundle, source, to, false, wait)) {
      return *started;
    }
  }
}

void Store::allocate(BundleId id, Tier tier) {
  impl_->check_movable();
  BudgetWait wait(options_.budget_wait_seconds);
  std::unique_lock<std::mutex> lock(impl_->mutex);
  Bundle& bundle = impl_->bundle_locked(id);
  impl_->check_tier_configured(bundle, tier);
  FERRY_CHECK(tier != Tier::kNvme, "cannot allocate ", describe(bundle, tier),
              " for writing: NVMe copies are written through write_back");
  Copy& copy = bundle.at(tier);
  FERRY_CHECK(copy.state == CopyState::kAbsent, "cannot allocate ", describe(bundle, tier),
              ": it is already ", to_string(copy.state));
  while (!impl_->allocate_locked(bundle, tier)) {
    if (!impl_->wait_for_room(lock, wait)) {
      throw impl_->budget_exceeded_locked(tier, impl_->pool_of(bundle, tier), detail::concat("allocating ", describe(bundle, tier)),
                                          bundle.storage_bytes, wait);
    }
  }
  // Claimed before the memory exists, so no other thread allocates this copy meanwhile.
  copy.state = CopyState::kLoading;
  lock.unlock();
  torch::Tensor memory;
  try {
    if (tier == Tier::kGpu) {
      memory = impl_->copier->allocate(static_cast<std::int64_t>(bundle.storage_bytes)).zero_();
    } else {
      std::memset(copy.host.data(), 0, bundle.storage_bytes);
    }
  } catch (...) {
    lock.lock();
    torch::Tensor released;
    impl_->free_locked(bundle, tier, &released);
    copy.state = CopyState::kAbsent;
    throw;
  }
  lock.lock();
  if (tier == Tier::kGpu) copy.gpu = std::move(memory);
  copy.version = ++bundle.version;
  copy.state = CopyState::kDirty;
}

void Store::mark_dirty(BundleId id, Tier tier) {
  impl_->check_movable();
  std::lock_guard<std::mutex> lock(impl_->mutex);
  Bundle& bundle = impl_->bundle_locked(id);
  impl_->check_tier_configured(bundle, tier);
  FERRY_CHECK(tier != Tier::kNvme, "cannot mark ", describe(bundle, tier),
              " dirty: NVMe copies are never modified in place; modify the host or gpu copy and "
              "write it back");
  Copy& copy = bundle.at(tier);
  FERRY_CHECK(copy.state == CopyState::kReady || copy.state == CopyState::kDirty,
              "cannot mark ", describe(bundle, tier), " dirty: it is ", to_string(copy.state),
              "; only a ready or dirty copy can be modified");
  FERRY_CHECK(copy.readers == 0, "cannot mark ", describe(bundle, tier),
              " dirty: a transfer is reading it; wait for its Fence first");
  copy.version = ++bundle.version;
  copy.state = CopyState::kDirty;
}

Fence Store::write_back(BundleId id, Tier from, Tier to) {
  impl_->check_movable();
  BudgetWait wait(options_.budget_wait_seconds);
  std::unique_lock<std::mutex> lock(impl_->mutex);
  for (;;) {
    Bundle& bundle = impl_->bundle_locked(id);
    impl_->check_tier_configured(bundle, from);
    impl_->check_tier_configured(bundle, to);
    FERRY_CHECK(from != to, "cannot write ", describe(bundle, from),
                " back to itself: give two different tiers");
    Copy& origin = bundle.at(from);
    FERRY_CHECK(origin.state == CopyState::kReady || origin.state == CopyState::kDirty,
                "cannot write back from ", describe(bundle, from), ": it is ",
                to_string(origin.state), "; only a ready or dirty copy can be written back");
    FERRY_CHECK(bundle.up_to_date(from), "cannot write back from ", describe(bundle, from),
                ": it is stale (another copy was marked dirty since); write back from the "
                "up-to-date copy");
    Copy& target = bundle.at(to);
    FERRY_CHECK(!in_flight(target.state) && target.readers == 0, "cannot write back into ",
                describe(bundle, to), ": it is ", to_string(target.state),
                " with a transfer in flight; wait for its Fence first");
    if (bundle.up_to_date(to)) {
      origin.state = CopyState::kReady;
      return Fence();
    }
    if (std::optional<Fence> started = impl_->try_start(lock, bundle, from, to, true, wait)) {
      return *started;
    }
  }
}

// evict and discard: drop a copy that is not home and has no transfer in flight.
void Store::drop(BundleId id, Tier tier, bool keep_only_latest) {
  const char* verb = keep_only_latest ? "evict" : "discard";
  torch::Tensor released;
  std::lock_guard<std::mutex> lock(impl_->mutex);
  Bundle& bundle = impl_->bundle_locked(id);
  impl_->check_tier_configured(bundle, tier);
  Copy& copy = bundle.at(tier);
  FERRY_CHECK(tier != bundle.spec.home, "cannot ", verb, " ", describe(bundle, tier),
              ": it is the bundle's home copy (", to_string(copy.state),
              "); only copies on other tiers can be dropped");
  FERRY_CHECK(copy.state != CopyState::kAbsent, "cannot ", verb, " ", describe(bundle, tier),
              ": it is already absent");
  FERRY_CHECK(!in_flight(copy.state) && copy.readers == 0, "cannot ", verb, " ",
              describe(bundle, tier), ": it is ", to_string(copy.state),
              " with a transfer in flight; wait for its Fence first");
  if (keep_only_latest && bundle.up_to_date(tier)) {
    bool another = false;
    for (Tier other : kTiers) another = another || (other != tier && bundle.up_to_date(other));
    FERRY_CHECK(another, "cannot evict ", describe(bundle, tier), ": it is ",
                to_string(copy.state), " and the only up-to-date copy; write it back to ",
                to_string(bundle.spec.home), " first");
  }
  impl_->free_locked(bundle, tier, &released);
  if (impl_->copier) impl_->copier->retire(released);
  if (keep_only_latest) return;
  // The newest remaining contents are the bundle's contents again.
  std::uint64_t newest = 0;
  for (Tier other : kTiers) {
    const Copy& remaining = bundle.at(other);
    // A copy writing back holds its contents; one loading does not hold them yet.
    if (remaining.state != CopyState::kAbsent && remaining.state != CopyState::kLoading) {
      newest = std::max(newest, remaining.version);
    }
  }
  bundle.version = newest;
}

void Store::evict(BundleId id, Tier tier) { drop(id, tier, /*keep_only_latest=*/true); }

void Store::discard(BundleId id, Tier tier) { drop(id, tier, /*keep_only_latest=*/false); }

void Store::remove(BundleId id) {
  std::vector<torch::Tensor> released(kTierCount);
  std::lock_guard<std::mutex> lock(impl_->mutex);
  Bundle& bundle = impl_->bundle_locked(id);
  for (Tier tier : kTiers) {
    const Copy& copy = bundle.at(tier);
    FERRY_CHECK(!in_flight(copy.state) && copy.readers == 0, "cannot remove bundle '",
                bundle.spec.name, "': ", describe(bundle, tier), " is ", to_string(copy.state),
                " with a transfer in flight; wait for its Fence first");
  }
  for (Tier tier : kTiers) {
    if (bundle.at(tier).state == CopyState::kAbsent) continue;
    impl_->free_locked(bundle, tier, &released[index(tier)]);
    if (impl_->copier) impl_->copier->retire(released[index(tier)]);
  }
  impl_->bundles[id].reset();
}

void Store::synchronize() { impl_->synchronize(); }

StoreStats Store::stats() const {
  StoreStats stats;
  for (Tier tier : kTiers) {
    int t = index(tier);
    stats.tiers[t].budget_bytes = impl_->budget_bytes[t];
    stats.tiers[t].used_bytes = impl_->used_bytes[t].load(std::memory_order_relaxed);
    stats.tiers[t].peak_bytes = impl_->peak_bytes[t].load(std::memory_order_relaxed);
    stats.tiers[t].refusals = impl_->refusals[t].load(std::memory_order_relaxed);
    for (Tier to : kTiers) stats.transfers[t][index(to)] = impl_->counters->read(tier, to);
  }
  std::lock_guard<std::mutex> lock(impl_->mutex);
  for (const Pool& pool : impl_->pools) stats.pools.push_back({pool.name, pool.tier, pool.bytes, pool.used, pool.peak});
  return stats;
}

}  // namespace ferry
