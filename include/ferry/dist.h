#pragma once

// Data parallelism over PyTorch's c10d (docs/distributed.md): one process per device, launched by
// torchrun or anything that sets its variables. The engine takes a Communicator in
// EngineConfig::communicator; every rank then trains the same model on its own rows of each batch
// (ZeRO stage 2): as each part's backward finishes its gradients are reduce-scattered, each rank
// updates its 1/N shard of the part's fp32 master and optimizer states, and the updated
// parameters are all-gathered.
//
//   ferry::dist::World world = ferry::dist::World::from_environment();
//   config.device = torch::Device(torch::kCUDA, world.local_rank);
//   config.communicator = ferry::dist::connect(world, {config.device});

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/types.h>

namespace ferry::dist {

// Where this process is among the job's: torchrun's RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
// MASTER_PORT.
struct World {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;  // the device index on this host
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;

  // From the environment; without WORLD_SIZE, a world of one (the other variables are then
  // ignored). Throws ferry::Error naming a variable that is missing or out of range.
  static World from_environment();
};

struct CommunicatorOptions {
  // The device the engine computes on. A CUDA device reduces its tensors over NCCL where the
  // LibTorch ferry is built against has it (Gloo otherwise); control traffic is always Gloo.
  torch::Device device = torch::kCPU;
  // How long a collective or the rendezvous waits for the other ranks before it throws: a rank
  // that died or is stuck stops the others instead of hanging them.
  std::chrono::milliseconds timeout = std::chrono::minutes(5);
};

// Which of the communicator's process groups a collective goes through. c10d matches collectives
// by their order in a group, so each group is used by one thread only: kMain by the thread that
// drives the step, kUpdate by the engine's CPU update worker (its all-gathers of updated
// parameters), each in the same order on every rank.
enum class Group { kMain, kUpdate };

// A collective in flight. Its result is in place once wait() has returned; for a CUDA tensor,
// once the stream that was current at wait() reaches that point (the host does not block). A
// default-made one has nothing to wait for.
class Pending {
 public:
  Pending() = default;
  bool pending() const { return static_cast<bool>(finish_); }
  // Throws ferry::Error when the collective failed or timed out; later calls return at once.
  void wait();

 private:
  friend class Communicator;
  explicit Pending(std::function<void()> finish) : finish_(std::move(finish)) {}
  std::function<void()> finish_;
};

// A process group of the world's ranks. Collectives are issued by one thread at a time per
// Group, in the same order on every rank (c10d's contract).
class Communicator {
 public:
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const;
  int world_size() const;
  const std::string& backend() const;  // "gloo" or "nccl": the one the device's tensors take

  // Sums `tensor` over the ranks in place; every rank ends with the same bits. A CUDA tensor is
  // reduced on the device: the current stream waits for the result, the host does not.
  void all_reduce_sum(torch::Tensor& tensor, Group group = Group::kMain);
  // `tensor` is flat, its rank r's shard [r * shard_numel, (r + 1) * shard_numel) clipped to its
  // size. reduce_scatter_sum leaves the sum over the ranks in this rank's shard (the rest is then
  // unspecified); all_gather fills every shard from its rank.
  //
  // Note: ProcessGroupGloo in LibTorch 1.13 declares reduce_scatter but throws when called, so
  // Gloo all-reduces the whole tensor (N times the traffic of a reduce-scatter, the same sums);
  // NCCL reduce-scatters. Both pad a tensor shorter than world_size * shard_numel through a copy.
  void reduce_scatter_sum(torch::Tensor& tensor, std::int64_t shard_numel, Group group = Group::kMain);
  // reduce_scatter_sum without waiting: the caller overlaps it with work that does not touch
  // `tensor`, and waits before it reads or writes `tensor` again.
  Pending start_reduce_scatter_sum(const torch::Tensor& tensor, std::int64_t shard_numel,
                                   Group group = Group::kMain);
  void all_gather(torch::Tensor& tensor, std::int64_t shard_numel, Group group = Group::kMain);
  // Every rank's `text`, in rank order, on every rank: one all-reduce of the lengths and one
  // all-gather of the bytes, padded to the longest.
  std::vector<std::string> all_gather_text(const std::string& text, Group group = Group::kMain);
  // Every rank says how `what` went: `error` empty when it went well. Returns when it went well
  // everywhere; otherwise throws ferry::Error on every rank, naming each rank that failed and
  // its error. The way to keep one rank's failure from hanging the others at their next
  // collective.
  void agree(const std::string& what, const std::string& error = "");
  void barrier();

 private:
  struct Impl;
  explicit Communicator(std::unique_ptr<Impl> impl);
  friend std::shared_ptr<Communicator> connect(const World& world, const CommunicatorOptions& options);
  std::unique_ptr<Impl> impl_;
};

// Joins the world: rank 0 serves a c10d TCPStore at master_addr:master_port, the others connect
// to it, and every rank makes its process groups over it. Throws ferry::Error naming the address
// when the rendezvous does not complete within the timeout.
std::shared_ptr<Communicator> connect(const World& world, const CommunicatorOptions& options = {});

}  // namespace ferry::dist
