// The residency manager against real files and the real I/O engine. The GPU tier runs on
// torch::kCPU here; where CUDA is available the same test bodies also run on the GPU.

#include <cerrno>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <unistd.h>

#include <torch/cuda.h>
#include <torch/types.h>

#include "ferry/testing/io_fault.h"
#include "ferry/store.h"
#include "io/descriptors.h"
#include "support/random_bytes.h"
#include "support/temp_dir.h"

// glog, which LibTorch includes, defines a CHECK macro of its own; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

using namespace ferry;
using ferry::testing::TempDir;
using Catch::Matchers::Contains;

namespace {

constexpr std::uint64_t kMiB = std::uint64_t{1} << 20;

std::vector<torch::Device> test_devices() {
  std::vector<torch::Device> devices = {torch::kCPU};
  if (torch::cuda::is_available()) devices.emplace_back(torch::kCUDA, 0);
  return devices;
}

StoreOptions options_in(const TempDir& dir, torch::Device device) {
  StoreOptions options;
  options.device = device;
  options.gpu_budget_bytes = 16 * kMiB;
  options.host_budget_bytes = 16 * kMiB;
  options.nvme_directories = {dir.subdir("nvme0"), dir.subdir("nvme1")};
  options.nvme_budget_bytes = 64 * kMiB;
  options.stripe_bytes = 64 << 10;
  return options;
}

bool same_bytes(const torch::Tensor& a, const torch::Tensor& b) { return a.cpu().equal(b.cpu()); }

bool all_zero(const torch::Tensor& bytes) { return bytes.cpu().count_nonzero().item<std::int64_t>() == 0; }

// Lets the first `free_passes` transfers through, then holds every transfer until opened.
class Gate {
 public:
  explicit Gate(int free_passes) : free_passes_(free_passes) {}
  void pass() {
    std::unique_lock<std::mutex> lock(mutex_);
    if (free_passes_ > 0) {
      --free_passes_;
      return;
    }
    ++held_;
    changed_.notify_all();
    changed_.wait(lock, [this] { return open_; });
  }
  void wait_until_held() {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [this] { return held_ > 0; });
  }
  void open() {
    std::lock_guard<std::mutex> lock(mutex_);
    open_ = true;
    changed_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  int free_passes_;
  int held_ = 0;
  bool open_ = false;
};

// Real files whose transfers pass through a Gate once one is armed.
class GatedEnv : public Env {
 public:
  std::unique_ptr<File> open(const std::string& path, OpenMode mode, bool try_direct) override {
    return std::make_unique<GatedFile>(path, ferry::detail::open_descriptors(path, mode, try_direct), this);
  }
  void arm(Gate* gate) { gate_.store(gate); }

 private:
  class GatedFile final : public File {
   public:
    GatedFile(std::string path, ferry::detail::FileDescriptors fds, GatedEnv* env)
        : File(std::move(path), fds.direct, fds.buffered), env_(env) {}
    InjectedFault before_transfer(IoOp op, uint64_t offset, size_t length) override {
      if (Gate* gate = env_->gate_.load()) gate->pass();
      return {};
    }

   private:
    GatedEnv* env_;
  };

  std::atomic<Gate*> gate_{nullptr};
};

}  // namespace

TEST_CASE("random bytes survive GPU -> host -> NVMe -> host -> GPU for several bundles") {
  torch::Device device = GENERATE(from_range(test_devices()));
  IoBackendKind backend = GENERATE(IoBackendKind::kIoUring, IoBackendKind::kLibaio,
                                   IoBackendKind::kThreadPool);
  INFO("device " << device << ", I/O backend " << to_string(backend));
  TempDir dir;
  StoreOptions options = options_in(dir, device);
  options.io.backend = backend;
  Store store(options);
  const std::uint64_t sizes[] = {1, 4096, 100000, kMiB + 13};
  std::vector<BundleId> ids;
  std::vector<torch::Tensor> contents;
  for (std::uint64_t bytes : sizes) {
    BundleId id = store.add({"block." + std::to_string(ids.size()) + ".params", bytes, Tier::kNvme});
    CHECK(store.state(id, Tier::kNvme) == CopyState::kReady);
    // The home copy reads as zeros, staged through the host.
    store.fetch(id, Tier::kGpu).wait();
    CHECK(store.state(id, Tier::kHost) == CopyState::kReady);
    CHECK(store.state(id, Tier::kGpu) == CopyState::kReady);
    torch::Tensor gpu = store.tensor(id, Tier::kGpu);
    CHECK(gpu.numel() == static_cast<std::int64_t>(bytes));
    CHECK(gpu.device() == device);
    CHECK(all_zero(gpu));

    contents.push_back(random_bytes(bytes, static_cast<unsigned>(ids.size())));
    gpu.copy_(contents.back());
    store.mark_dirty(id, Tier::kGpu);
    ids.push_back(id);
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    store.write_back(ids[i], Tier::kGpu, Tier::kHost).wait();
    CHECK(store.state(ids[i], Tier::kGpu) == CopyState::kReady);
    CHECK(same_bytes(store.tensor(ids[i], Tier::kHost), contents[i]));
  }
  std::vector<Fence> written;
  for (BundleId id : ids) written.push_back(store.write_back(id, Tier::kHost, Tier::kNvme));
  for (const Fence& fence : written) fence.wait();
  for (BundleId id : ids) {
    CHECK(store.up_to_date(id, Tier::kNvme));
    store.evict(id, Tier::kGpu);
    store.evict(id, Tier::kHost);
    CHECK(store.state(id, Tier::kHost) == CopyState::kAbsent);
  }
  CHECK(store.stats().tiers[static_cast<int>(Tier::kHost)].used_bytes == 0);

  std::vector<Fence> fetched;
  for (BundleId id : ids) fetched.push_back(store.fetch(id, Tier::kGpu));
  for (const Fence& fence : fetched) fence.order_current_stream();
  for (size_t i = 0; i < ids.size(); ++i) {
    fetched[i].wait();
    CHECK(fetched[i].ready());
    CHECK(same_bytes(store.tensor(ids[i], Tier::kGpu), contents[i]));
    CHECK(same_bytes(store.tensor(ids[i], Tier::kHost), contents[i]));
  }
}

TEST_CASE("every tier's home copy starts zero-filled") {
  torch::Device device = GENERATE(from_range(test_devices()));
  TempDir dir;
  Store store(options_in(dir, device));
  BundleId on_gpu = store.add({"gpu", 5000, Tier::kGpu});
  BundleId on_host = store.add({"host", 5000, Tier::kHost});
  CHECK(all_zero(store.tensor(on_gpu, Tier::kGpu)));
  CHECK(all_zero(store.tensor(on_host, Tier::kHost)));
  CHECK(store.size() == 2);
  CHECK(store.spec(on_host).name == "host");
  CHECK(store.stats().tiers[static_cast<int>(Tier::kGpu)].used_bytes == 8192);
}

TEST_CASE("the state machine moves through every state and refuses what it does not allow") {
  torch::Device device = GENERATE(from_range(test_devices()));
  TempDir dir;
  Store store(options_in(dir, device));
  BundleId id = store.add({"block.3.master", 10000, Tier::kHost});
  CHECK(store.state(id, Tier::kHost) == CopyState::kReady);
  CHECK(store.state(id, Tier::kGpu) == CopyState::kAbsent);
  CHECK(store.state(id, Tier::kNvme) == CopyState::kAbsent);

  CHECK_THROWS_WITH(store.evict(id, Tier::kHost),
                    Contains("host copy of bundle 'block.3.master' (id 0)") &&
                        Contains("home copy") && Contains("ready"));
  CHECK_THROWS_WITH(store.evict(id, Tier::kGpu), Contains("gpu copy") && Contains("already absent"));
  CHECK_THROWS_WITH(store.tensor(id, Tier::kGpu), Contains("gpu copy") && Contains("absent") &&
                                                      Contains("fetch it first"));
  CHECK_THROWS_WITH(store.tensor(id, Tier::kNvme), Contains("only gpu and host copies"));
  CHECK_THROWS_WITH(store.write_back(id, Tier::kGpu, Tier::kHost),
                    Contains("cannot write back from the gpu copy") && Contains("absent"));
  CHECK_THROWS_WITH(store.mark_dirty(id, Tier::kGpu), Contains("gpu copy") && Contains("absent"));
  CHECK_THROWS_WITH(store.mark_dirty(id, Tier::kNvme), Contains("never modified in place"));
  CHECK_THROWS_WITH(store.write_back(id, Tier::kHost, Tier::kHost), Contains("back to itself"));
  CHECK_THROWS_WITH(store.state(7, Tier::kGpu), Contains("unknown BundleId 7") && Contains("ids 0 to 0"));
  CHECK_THROWS_WITH(store.fetch(7, Tier::kGpu), Contains("unknown BundleId 7"));

  // kAbsent -> kReady -> kDirty: the other copies become stale but keep their memory.
  store.fetch(id, Tier::kGpu).wait();
  CHECK(store.fetch(id, Tier::kGpu).ready());  // already up to date
  store.mark_dirty(id, Tier::kGpu);
  CHECK(store.state(id, Tier::kGpu) == CopyState::kDirty);
  CHECK(store.state(id, Tier::kHost) == CopyState::kReady);
  CHECK_FALSE(store.up_to_date(id, Tier::kHost));
  CHECK(store.up_to_date(id, Tier::kGpu));
  CHECK_THROWS_WITH(store.evict(id, Tier::kGpu),
                    Contains("gpu copy") && Contains("dirty") && Contains("only up-to-date copy") &&
                        Contains("write it back to host"));
  CHECK_THROWS_WITH(store.write_back(id, Tier::kHost, Tier::kNvme), Contains("stale"));

  // kDirty -> (write back) -> kReady; then the GPU copy may go.
  store.write_back(id, Tier::kGpu, Tier::kNvme).wait();
  CHECK(store.state(id, Tier::kGpu) == CopyState::kReady);
  CHECK(store.up_to_date(id, Tier::kNvme));
  CHECK(store.up_to_date(id, Tier::kHost));  // the write-back staged through it
  store.evict(id, Tier::kGpu);
  CHECK(store.state(id, Tier::kGpu) == CopyState::kAbsent);

  // A stale copy is refreshed by fetch, and a write-back to an up-to-date copy moves nothing.
  store.fetch(id, Tier::kGpu).wait();
  store.mark_dirty(id, Tier::kHost);
  CHECK_FALSE(store.up_to_date(id, Tier::kGpu));
  store.evict(id, Tier::kNvme);  // stale copies may go
  std::uint64_t moved = store.stats().transfers[1][0].bytes;
  store.fetch(id, Tier::kGpu).wait();
  CHECK(store.up_to_date(id, Tier::kGpu));
  CHECK(store.stats().transfers[1][0].bytes == moved + 12288);
  CHECK(store.write_back(id, Tier::kHost, Tier::kGpu).ready());
  CHECK(store.state(id, Tier::kHost) == CopyState::kReady);
}

TEST_CASE("a copy with a transfer in flight is loading and refuses everything else") {
  IoBackendKind backend = GENERATE(IoBackendKind::kIoUring, IoBackendKind::kLibaio,
                                   IoBackendKind::kThreadPool);
  INFO("I/O backend " << to_string(backend));
  TempDir dir;
  GatedEnv env;
  StoreOptions options = options_in(dir, torch::kCPU);
  options.io.backend = backend;
  options.env = &env;
  options.io.queue_depth = 1;
  options.io.block_bytes = 4096;
  Store store(options);
  BundleId id = store.add({"block.0.grads", 3 * 4096, Tier::kHost});
  store.mark_dirty(id, Tier::kHost);
  store.write_back(id, Tier::kHost, Tier::kNvme).wait();
  store.mark_dirty(id, Tier::kHost);

  Gate gate(1);  // the first 4096 bytes move, the rest wait
  env.arm(&gate);
  Fence writing = store.write_back(id, Tier::kHost, Tier::kNvme);
  gate.wait_until_held();
  CHECK_FALSE(writing.ready());
  CHECK(store.state(id, Tier::kHost) == CopyState::kWritingBack);
  CHECK(store.state(id, Tier::kNvme) == CopyState::kLoading);
  CHECK_THROWS_WITH(store.mark_dirty(id, Tier::kHost), Contains("writing back"));
  CHECK_THROWS_WITH(store.evict(id, Tier::kNvme),
                    Contains("nvme copy") && Contains("loading") && Contains("in flight"));
  CHECK_THROWS_WITH(store.tensor(id, Tier::kHost),
                    Contains("writing back") && Contains("wait for its Fence"));
  CHECK_THROWS_WITH(store.write_back(id, Tier::kHost, Tier::kNvme), Contains("writing back"));
  // Reading the copy that is being written back is fine.
  store.fetch(id, Tier::kGpu).wait();
  CHECK(store.up_to_date(id, Tier::kGpu));
  Fence joined = store.fetch(id, Tier::kNvme);  // the same transfer, already under way
  CHECK_FALSE(joined.ready());
  gate.open();
  joined.wait();
  writing.wait();
  CHECK(store.state(id, Tier::kHost) == CopyState::kReady);
  CHECK(store.state(id, Tier::kNvme) == CopyState::kReady);
  CHECK(store.up_to_date(id, Tier::kNvme));
  store.evict(id, Tier::kNvme);
}

TEST_CASE("budgets are hard: a request beyond one fails with the shortfall") {
  torch::Device device = GENERATE(from_range(test_devices()));
  TempDir dir;
  StoreOptions options = options_in(dir, device);
  options.gpu_budget_bytes = 3 * kMiB;
  options.host_budget_bytes = 2 * kMiB;
  options.nvme_budget_bytes = 4 * kMiB;
  Store store(options);
  BundleId a = store.add({"block.0.master", kMiB, Tier::kNvme});
  BundleId b = store.add({"block.1.master", kMiB, Tier::kNvme});
  BundleId c = store.add({"block.2.master", kMiB, Tier::kNvme});
  store.fetch(a, Tier::kHost).wait();
  store.fetch(b, Tier::kHost).wait();
  CHECK_THROWS_AS(store.fetch(c, Tier::kHost), BudgetExceeded);
  CHECK_THROWS_WITH(store.fetch(c, Tier::kHost),
                    Contains("host budget 2.00 MiB: 2.00 MiB in use, the fetch of block.2.master "
                             "to host needs 1.00 MiB, 1.00 MiB short") &&
                        Contains("raise the host budget"));
  CHECK(store.state(c, Tier::kHost) == CopyState::kAbsent);
  // NVMe -> GPU needs a host copy to stage through: refused as a whole, nothing half-allocated.
  CHECK_THROWS_WITH(store.fetch(c, Tier::kGpu), Contains("host budget"));
  CHECK(store.state(c, Tier::kGpu) == CopyState::kAbsent);
  CHECK(store.stats().tiers[static_cast<int>(Tier::kGpu)].used_bytes == 0);

  store.fetch(a, Tier::kGpu).wait();
  store.fetch(b, Tier::kGpu).wait();
  store.evict(b, Tier::kHost);
  store.fetch(c, Tier::kGpu).wait();
  store.evict(c, Tier::kHost);
  BundleId d = store.add({"block.3.master", kMiB, Tier::kNvme});
  store.fetch(d, Tier::kHost).wait();
  CHECK_THROWS_WITH(store.fetch(d, Tier::kGpu),
                    Contains("gpu budget 3.00 MiB: 3.00 MiB in use") && Contains("1.00 MiB short"));
  CHECK_THROWS_WITH(store.add({"block.4.master", 2 * kMiB, Tier::kNvme}),
                    Contains("nvme budget 4.00 MiB: 4.00 MiB in use, adding bundle 'block.4.master' "
                             "needs 2.00 MiB, 2.00 MiB short"));
  CHECK(store.size() == 4);

  StoreStats stats = store.stats();
  for (int tier = 0; tier < kTierCount; ++tier) {
    INFO("tier " << to_string(static_cast<Tier>(tier)));
    CHECK(stats.tiers[tier].peak_bytes <= stats.tiers[tier].budget_bytes);
    CHECK(stats.tiers[tier].refusals > 0);
  }
  CHECK(stats.tiers[static_cast<int>(Tier::kGpu)].peak_bytes == 3 * kMiB);
}

TEST_CASE("a fetch beyond the budget waits for another thread's eviction") {
  torch::Device device = GENERATE(from_range(test_devices()));
  TempDir dir;
  StoreOptions options = options_in(dir, device);
  options.host_budget_bytes = 2 * kMiB;
  options.budget_wait_seconds = 60;
  Store store(options);
  BundleId a = store.add({"a", kMiB, Tier::kNvme});
  BundleId b = store.add({"b", kMiB, Tier::kNvme});
  BundleId c = store.add({"c", kMiB, Tier::kNvme});
  store.fetch(a, Tier::kHost).wait();
  store.fetch(b, Tier::kHost).wait();
  std::thread evictor([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    store.evict(a, Tier::kHost);
  });
  store.fetch(c, Tier::kHost).wait();
  evictor.join();
  CHECK(store.state(a, Tier::kHost) == CopyState::kAbsent);
  CHECK(store.state(c, Tier::kHost) == CopyState::kReady);
  CHECK(store.stats().tiers[static_cast<int>(Tier::kHost)].peak_bytes <= 2 * kMiB);
}

TEST_CASE("a failed NVMe transfer surfaces from Fence::wait and leaves no zero-filled copy") {
  torch::Device device = GENERATE(from_range(test_devices()));
  TempDir dir;
  FaultInjectingEnv env;
  StoreOptions options = options_in(dir, device);
  options.env = &env;
  Store store(options);
  BundleId id = store.add({"block.5.exp_avg", 300000, Tier::kNvme});
  torch::Tensor contents = random_bytes(300000, 5);
  store.fetch(id, Tier::kHost).wait();
  store.tensor(id, Tier::kHost).copy_(contents);
  store.mark_dirty(id, Tier::kHost);
  store.write_back(id, Tier::kHost, Tier::kNvme).wait();
  store.evict(id, Tier::kHost);

  env.fail(IoOp::kRead, "ferry-store.bin", 0, EIO);
  Fence failed = store.fetch(id, Tier::kHost);
  CHECK_THROWS_AS(failed.wait(), IoException);
  CHECK_THROWS_WITH(failed.wait(), Contains("ferry-store.bin") && Contains("offset") &&
                                       Contains("Input/output error"));
  CHECK(store.state(id, Tier::kHost) == CopyState::kAbsent);
  CHECK(store.stats().tiers[static_cast<int>(Tier::kHost)].used_bytes == 0);
  // Staged to the GPU: both the host and the GPU copy stay absent.
  CHECK_THROWS_AS(store.fetch(id, Tier::kGpu).wait(), IoException);
  CHECK(store.state(id, Tier::kHost) == CopyState::kAbsent);
  CHECK(store.state(id, Tier::kGpu) == CopyState::kAbsent);
  CHECK(store.stats().tiers[static_cast<int>(Tier::kGpu)].used_bytes == 0);

  env.clear();
  store.fetch(id, Tier::kGpu).wait();
  CHECK(same_bytes(store.tensor(id, Tier::kGpu), contents));

  // A failed write leaves the home copy stale, so the host copy cannot be dropped.
  store.tensor(id, Tier::kHost).fill_(7);
  store.mark_dirty(id, Tier::kHost);
  env.fail(IoOp::kWrite, "ferry-store.bin", 0, EIO);
  Fence written = store.write_back(id, Tier::kHost, Tier::kNvme);
  CHECK_THROWS_AS(written.wait(), IoException);
  CHECK(store.state(id, Tier::kHost) == CopyState::kDirty);
  CHECK_FALSE(store.up_to_date(id, Tier::kNvme));
  CHECK_THROWS_WITH(store.evict(id, Tier::kHost), Contains("only up-to-date copy"));
  env.clear();
  store.write_back(id, Tier::kHost, Tier::kNvme).wait();
  CHECK(store.up_to_date(id, Tier::kNvme));
}

TEST_CASE("statistics count the bytes and transfers of each tier pair") {
  torch::Device device = GENERATE(from_range(test_devices()));
  TempDir dir;
  Store store(options_in(dir, device));
  BundleId id = store.add({"block.0.params", 10000, Tier::kHost});
  store.fetch(id, Tier::kGpu).wait();
  store.mark_dirty(id, Tier::kGpu);
  store.write_back(id, Tier::kGpu, Tier::kNvme).wait();
  store.evict(id, Tier::kGpu);
  store.fetch(id, Tier::kGpu).wait();

  StoreStats stats = store.stats();
  auto pair = [&](Tier from, Tier to) {
    return stats.transfers[static_cast<int>(from)][static_cast<int>(to)];
  };
  CHECK(pair(Tier::kHost, Tier::kGpu).bytes == 2 * 12288);
  CHECK(pair(Tier::kHost, Tier::kGpu).transfers == 2);
  CHECK(pair(Tier::kGpu, Tier::kHost).bytes == 12288);
  CHECK(pair(Tier::kHost, Tier::kNvme).bytes == 12288);
  CHECK(pair(Tier::kHost, Tier::kNvme).transfers == 1);
  CHECK(pair(Tier::kNvme, Tier::kHost).bytes == 0);
  CHECK(pair(Tier::kGpu, Tier::kNvme).bytes == 0);  // staged: counted per hop
  CHECK(pair(Tier::kHost, Tier::kNvme).busy_seconds > 0);
  CHECK(pair(Tier::kNvme, Tier::kHost).busy_seconds == 0);
  CHECK(stats.tiers[static_cast<int>(Tier::kNvme)].used_bytes == 12288);
  CHECK(stats.tiers[static_cast<int>(Tier::kGpu)].peak_bytes == 12288);
}

TEST_CASE("on_transfer sees every hop with its tiers, bytes and times, failed ones with no bytes") {
  torch::Device device = GENERATE(from_range(test_devices()));
  TempDir dir;
  FaultInjectingEnv env;
  StoreOptions options = options_in(dir, device);
  options.env = &env;
  std::mutex mutex;
  std::vector<TransferSpan> spans;
  options.on_transfer = [&](const TransferSpan& span) {
    std::lock_guard<std::mutex> lock(mutex);
    spans.push_back(span);
  };
  Store store(options);
  BundleId id = store.add({"block.2.params", 10000, Tier::kNvme});
  store.fetch(id, Tier::kHost).wait();
  store.mark_dirty(id, Tier::kHost);
  store.write_back(id, Tier::kHost, Tier::kNvme).wait();
  store.evict(id, Tier::kHost);
  store.fetch(id, Tier::kGpu).wait();  // two hops: nvme -> host -> gpu
  store.evict(id, Tier::kGpu);
  store.evict(id, Tier::kHost);
  env.fail(IoOp::kRead, "ferry-store.bin", 0, EIO);
  CHECK_THROWS_AS(store.fetch(id, Tier::kHost).wait(), IoException);

  std::lock_guard<std::mutex> lock(mutex);
  // The first fetch reads a never-written copy as zeros: a hop that moves no bytes.
  const Tier hops[][2] = {{Tier::kNvme, Tier::kHost}, {Tier::kHost, Tier::kNvme}, {Tier::kNvme, Tier::kHost},
                          {Tier::kHost, Tier::kGpu}, {Tier::kNvme, Tier::kHost}};
  const std::uint64_t bytes[] = {0, 12288, 12288, 12288, 0};
  REQUIRE(spans.size() == 5);
  for (std::size_t i = 0; i < spans.size(); ++i) {
    INFO("hop " << i);
    CHECK(spans[i].bundle == "block.2.params");
    CHECK(spans[i].from == hops[i][0]);
    CHECK(spans[i].to == hops[i][1]);
    CHECK(spans[i].start <= spans[i].end);
    CHECK(spans[i].bytes == bytes[i]);
  }
  CHECK(spans[2].end <= spans[3].start);
}

TEST_CASE("many threads fetch, modify, write back and evict their own bundles") {
  torch::Device device = GENERATE(from_range(test_devices()));
  TempDir dir;
  StoreOptions options = options_in(dir, device);
  options.gpu_budget_bytes = 4 * kMiB;
  options.host_budget_bytes = 4 * kMiB;
  options.budget_wait_seconds = 60;
  Store store(options);
  constexpr int kThreads = 4;
  constexpr int kBundlesPerThread = 3;
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::vector<BundleId> ids;
      for (int i = 0; i < kBundlesPerThread; ++i) {
        ids.push_back(store.add({"t" + std::to_string(t) + ".b" + std::to_string(i),
                                 static_cast<std::uint64_t>(200000 + 4096 * t + i), Tier::kNvme}));
      }
      for (int round = 0; round < 8; ++round) {
        for (BundleId id : ids) {
          store.fetch(id, Tier::kGpu).wait();
          torch::Tensor gpu = store.tensor(id, Tier::kGpu);
          std::uint8_t expected = static_cast<std::uint8_t>(round == 0 ? 0 : round - 1 + id);
          if (!gpu.cpu().eq(expected).all().item<bool>()) ++mismatches;
          gpu.fill_(static_cast<std::uint8_t>(round + id));
          store.mark_dirty(id, Tier::kGpu);
          store.write_back(id, Tier::kGpu, Tier::kNvme).wait();
          store.evict(id, Tier::kGpu);
          store.evict(id, Tier::kHost);
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(mismatches.load() == 0);
  StoreStats stats = store.stats();
  CHECK(stats.tiers[static_cast<int>(Tier::kGpu)].used_bytes == 0);
  CHECK(stats.tiers[static_cast<int>(Tier::kHost)].used_bytes == 0);
  CHECK(stats.tiers[static_cast<int>(Tier::kGpu)].peak_bytes <= 4 * kMiB);
  CHECK(stats.tiers[static_cast<int>(Tier::kHost)].peak_bytes <= 4 * kMiB);
  CHECK(stats.transfers[static_cast<int>(Tier::kHost)][static_cast<int>(Tier::kNvme)].transfers ==
        kThreads * kBundlesPerThread * 8);
}

TEST_CASE("a store without NVMe directories refuses the NVMe tier with what to configure") {
  StoreOptions options;
  options.gpu_budget_bytes = kMiB;
  options.host_budget_bytes = kMiB;
  Store store(options);
  CHECK_THROWS_WITH(store.add({"block.0.master", 4096, Tier::kNvme}),
                    Contains("nvme_directories is empty"));
  BundleId id = store.add({"block.0.params", 4096, Tier::kGpu});
  CHECK_THROWS_WITH(store.write_back(id, Tier::kGpu, Tier::kNvme), Contains("nvme_directories"));
  CHECK(store.state(id, Tier::kNvme) == CopyState::kAbsent);
}

TEST_CASE("allocate gives a scratch copy to write, which goes down and is dropped") {
  torch::Device device = GENERATE(from_range(test_devices()));
  TempDir dir;
  StoreOptions options = options_in(dir, device);
  options.gpu_budget_bytes = 8192;
  Store store(options);
  BundleId grads = store.add({"block.0.grads", 5000, Tier::kHost});
  store.allocate(grads, Tier::kGpu);
  CHECK(store.state(grads, Tier::kGpu) == CopyState::kDirty);
  CHECK(store.up_to_date(grads, Tier::kGpu));
  CHECK_FALSE(store.up_to_date(grads, Tier::kHost));
  CHECK(all_zero(store.tensor(grads, Tier::kGpu)));
  CHECK_THROWS_WITH(store.allocate(grads, Tier::kGpu), Contains("already dirty"));

  torch::Tensor data = random_bytes(5000, 3);
  store.tensor(grads, Tier::kGpu).copy_(data.to(device));
  store.write_back(grads, Tier::kGpu, Tier::kHost).wait();
  store.evict(grads, Tier::kGpu);
  CHECK(same_bytes(store.tensor(grads, Tier::kHost), data));
  CHECK(store.stats().tiers[static_cast<int>(Tier::kGpu)].used_bytes == 0);

  BundleId other = store.add({"block.1.grads", 5000, Tier::kHost});
  store.allocate(other, Tier::kGpu);
  CHECK_THROWS_WITH(store.allocate(grads, Tier::kGpu), Contains("gpu budget") && Contains("short"));
}

// Note: io_uring registers at most 1 GiB per fixed buffer, so a bundle past it lives in a host
// chunk of its own that is not registered, and moves through plain (O_DIRECT) reads and writes.
// One gpt3-175b block is 3.6 GB in bf16.
TEST_CASE("a bundle larger than 1 GiB goes to NVMe and comes back intact") {
  TempDir dir;
  const std::uint64_t bytes = (std::uint64_t{1} << 30) + 3 * kMiB + 4096;
  StoreOptions options = options_in(dir, torch::kCPU);
  options.host_budget_bytes = 2 * bytes;
  options.nvme_budget_bytes = 2 * bytes;
  options.stripe_bytes = 4 * kMiB;
  Store store(options);
  const BundleId id = store.add({"block.0.params", bytes, Tier::kNvme});
  store.allocate(id, Tier::kHost);
  torch::Tensor host = store.tensor(id, Tier::kHost);
  const torch::Tensor pattern = torch::arange(static_cast<std::int64_t>(bytes / 8), torch::kLong);
  host.view(torch::kLong).copy_(pattern);
  store.write_back(id, Tier::kHost, Tier::kNvme).wait();
  store.evict(id, Tier::kHost);
  store.fetch(id, Tier::kHost).wait();
  CHECK(store.tensor(id, Tier::kHost).view(torch::kLong).equal(pattern));
  const StoreStats stats = store.stats();
  CHECK(stats.transfers[static_cast<int>(Tier::kNvme)][static_cast<int>(Tier::kHost)].bytes >= bytes);
}

TEST_CASE("a pool holds the copies that name it, and the tier counts it from its reservation") {
  TempDir dir;
  Store store(options_in(dir, torch::kCPU));
  const PoolId pool = store.reserve(Tier::kHost, 2 * kMiB, "staging");
  CHECK(store.stats().tiers[static_cast<int>(Tier::kHost)].used_bytes == 2 * kMiB);
  BundleSpec spec{"a", kMiB, Tier::kNvme};
  spec.pools[static_cast<int>(Tier::kHost)] = pool;
  const BundleId a = store.add(spec);
  spec.name = "b";
  const BundleId b = store.add(spec);
  spec.name = "c";
  const BundleId c = store.add(spec);
  store.fetch(a, Tier::kHost).wait();
  store.fetch(b, Tier::kHost).wait();
  CHECK(store.stats().tiers[static_cast<int>(Tier::kHost)].used_bytes == 2 * kMiB);
  CHECK_THROWS_WITH(store.fetch(c, Tier::kHost), Contains("pool 'staging'") && Contains("2.00 MiB set aside"));
  CHECK_THROWS_WITH(store.release(pool), Contains("still draw from it"));
  store.evict(a, Tier::kHost);
  store.fetch(c, Tier::kHost).wait();
  const StoreStats stats = store.stats();
  REQUIRE(stats.pools.size() == 1);
  CHECK(stats.pools[0].peak_bytes == 2 * kMiB);
  CHECK(stats.tiers[static_cast<int>(Tier::kHost)].peak_bytes == 2 * kMiB);
  CHECK_THROWS_WITH(store.reserve(Tier::kHost, 15 * kMiB, "too much"), Contains("the pool 'too much' needs"));

  StoreOptions counting = options_in(dir, torch::kCPU);
  counting.count_only = true;
  Store counted(counting);
  counted.reserve(Tier::kGpu, kMiB, "window");
  counted.add({"x", 3 * kMiB, Tier::kNvme});
  CHECK(counted.stats().tiers[static_cast<int>(Tier::kGpu)].used_bytes == kMiB);
  CHECK(counted.stats().tiers[static_cast<int>(Tier::kNvme)].used_bytes == 3 * kMiB);
  CHECK_THROWS_WITH(counted.fetch(0, Tier::kHost), Contains("counting store"));
}

TEST_CASE("two stores of one process cannot share an NVMe store file, and the next one may once the first is gone") {
  TempDir dir;
  auto first = std::make_unique<Store>(options_in(dir, torch::kCPU));
  CHECK_THROWS_WITH(Store(options_in(dir, torch::kCPU)),
                    Contains("ferry-store.bin") && Contains("open in another engine of this process"));
  StoreOptions own_file = options_in(dir, torch::kCPU);
  own_file.nvme_file_name = "ferry-store.rank1.bin";
  CHECK_NOTHROW(Store(own_file));
  first.reset();
  CHECK_NOTHROW(Store(options_in(dir, torch::kCPU)));
}
