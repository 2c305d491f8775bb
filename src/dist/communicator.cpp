// The Communicator over c10d: a TCPStore for the rendezvous, ProcessGroupGloo for CPU tensors and
// control, ProcessGroupNCCL for CUDA tensors where the LibTorch has it (FERRY_WITH_NCCL).
//
// Note: the groups are used as backends, never through c10d's dispatching ProcessGroup: LibTorch
// 1.13's ProcessGroupGloo derives from c10d::ProcessGroup, 2.x's from c10d::Backend, and both
// have the same allreduce/barrier members, which is all this file calls (docs/distributed.md
// lists what is verified on which version).

#include "ferry/dist.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef FERRY_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <torch/torch.h>

#include "ferry/check.h"

namespace ferry::dist {

namespace {

// The variable's value, which must be an integer in [low, high].
int integer_variable(const char* name, int low, int high) {
  const char* text = std::getenv(name);
  FERRY_CHECK(text && *text, "the environment has WORLD_SIZE but not ", name,
              ": set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (torchrun does)");
  char* end = nullptr;
  errno = 0;
  const long value = std::strtol(text, &end, 10);
  FERRY_CHECK(errno == 0 && *end == '\0' && value >= low && value <= high, name, "='", text,
              "' is not an integer in [", low, ", ", high, "]");
  return static_cast<int>(value);
}

bool is_loopback(const std::string& address) {
  return address == "localhost" || address.rfind("127.", 0) == 0 || address == "::1";
}

std::shared_ptr<::gloo::transport::Device> gloo_device(const std::string& master_addr) {
  // As torch.distributed chooses: GLOO_SOCKET_IFNAME names the interface; a job on one host
  // talks over loopback; otherwise the address this host's name resolves to.
  if (const char* interface = std::getenv("GLOO_SOCKET_IFNAME"); interface && *interface) {
    return c10d::ProcessGroupGloo::createDeviceForInterface(interface);
  }
  if (is_loopback(master_addr)) return c10d::ProcessGroupGloo::createDeviceForHostname(master_addr);
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

}  // namespace

World World::from_environment() {
  World world;
  const char* size = std::getenv("WORLD_SIZE");
  if (!size || !*size) return world;
  world.world_size = integer_variable("WORLD_SIZE", 1, 1 << 20);
  world.rank = integer_variable("RANK", 0, world.world_size - 1);
  world.local_rank = integer_variable("LOCAL_RANK", 0, world.world_size - 1);
  const char* addr = std::getenv("MASTER_ADDR");
  FERRY_CHECK(addr && *addr, "the environment has WORLD_SIZE=", world.world_size,
              " but no MASTER_ADDR: set it to rank 0's host (torchrun does)");
  world.master_addr = addr;
  world.master_port = integer_variable("MASTER_PORT", 1, 65535);
  return world;
}

struct Communicator::Impl {
  int rank = 0;
  int world_size = 1;
  std::chrono::milliseconds timeout{};
  std::string backend = "gloo";
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo;         // Group::kMain
  c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo_update;  // Group::kUpdate
#ifdef FERRY_WITH_NCCL
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> nccl;
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> nccl_update;
#endif

  c10d::ProcessGroupGloo& gloo_for(Group group) { return group == Group::kMain ? *gloo : *gloo_update; }
#ifdef FERRY_WITH_NCCL
  c10d::ProcessGroupNCCL* nccl_for(const torch::Tensor& tensor, Group group) {
    if (!tensor.is_cuda()) return nullptr;
    return (group == Group::kMain ? nccl : nccl_update).get();
  }
#endif
  std::int64_t agreements = 0;  // the key of each agreement's errors in the store

  // Waits for `work`, turning c10d's errors into one that says what the likely causes are.
  template <typename Work>
  void wait(const Work& work, const char* what) {
    try {
      work->wait();
    } catch (const std::exception& e) {
      throw Error(detail::concat(what, " across ", world_size, " ranks failed (another rank stopped, or not all ",
                                 "answered within the timeout of ", timeout.count() / 1000.0, " s): ", e.what()));
    }
  }
};

Communicator::Communicator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Communicator::~Communicator() = default;

int Communicator::rank() const { return impl_->rank; }
int Communicator::world_size() const { return impl_->world_size; }
const std::string& Communicator::backend() const { return impl_->backend; }

void Communicator::all_reduce_sum(torch::Tensor& tensor, Group group) {
  FERRY_ASSERT(tensor.is_contiguous(), "all_reduce_sum needs a contiguous tensor");
  std::vector<at::Tensor> tensors{tensor};
#ifdef FERRY_WITH_NCCL
  if (auto* nccl = impl_->nccl_for(tensor, group)) return impl_->wait(nccl->allreduce(tensors), "all-reduce");
#endif
  // Note: Gloo in LibTorch 1.13 reduces no bf16: it reduces an fp32 copy (exact for the sums of
  // two bf16 values rounded back as NCCL rounds them).
  if (tensor.scalar_type() == torch::kBFloat16) {
    std::vector<at::Tensor> widened{tensor.to(torch::kFloat)};
    impl_->wait(impl_->gloo_for(group).allreduce(widened), "all-reduce");
    tensor.copy_(widened[0]);
    return;
  }
  impl_->wait(impl_->gloo_for(group).allreduce(tensors), "all-reduce");
}

namespace {

// `tensor` as world_size shards of shard_numel: itself when it has exactly that many elements,
// else a padded copy (of its values when `copy`).
torch::Tensor padded(const torch::Tensor& tensor, std::int64_t shard_numel, int world_size, bool copy) {
  const std::int64_t numel = shard_numel * world_size;
  if (tensor.numel() == numel) return tensor;
  torch::Tensor out = torch::zeros({numel}, tensor.options());
  if (copy) out.narrow(0, 0, tensor.numel()).copy_(tensor);
  return out;
}

}  // namespace

void Pending::wait() {
  if (!finish_) return;
  std::function<void()> finish = std::move(finish_);
  finish_ = nullptr;
  finish();
}

void Communicator::reduce_scatter_sum(torch::Tensor& tensor, std::int64_t shard_numel, Group group) {
  start_reduce_scatter_sum(tensor, shard_numel, group).wait();
}

// Note: c10d runs a Gloo collective on the group's own threads and an NCCL one on its own
// stream, each holding its tensors until done; the closure keeps the copies it reads back from.
Pending Communicator::start_reduce_scatter_sum(const torch::Tensor& tensor, std::int64_t shard_numel, Group group) {
  FERRY_ASSERT(tensor.is_contiguous() && tensor.dim() == 1 && shard_numel * impl_->world_size >= tensor.numel(),
               "reduce_scatter_sum needs a flat contiguous tensor of at most world_size shards");
  Impl* impl = impl_.get();
#ifdef FERRY_WITH_NCCL
  if (auto* nccl = impl->nccl_for(tensor, group)) {
    torch::Tensor input = padded(tensor, shard_numel, impl->world_size, /*copy=*/true);
    torch::Tensor output = input.narrow(0, impl->rank * shard_numel, shard_numel).clone();
    auto work = nccl->_reduce_scatter_base(output, input);
    return Pending([impl, work, tensor, output, shard_numel] {
      impl->wait(work, "reduce-scatter");
      const std::int64_t begin = std::min<std::int64_t>(impl->rank * shard_numel, tensor.numel());
      const std::int64_t size = std::min<std::int64_t>(shard_numel, tensor.numel() - begin);
      if (size > 0) tensor.narrow(0, begin, size).copy_(output.narrow(0, 0, size));
    });
  }
#endif
  // Gloo in LibTorch 1.13 reduces no bf16 (all_reduce_sum's Note): an fp32 copy is reduced.
  const bool widen = tensor.scalar_type() == torch::kBFloat16;
  std::vector<at::Tensor> tensors{widen ? tensor.to(torch::kFloat) : tensor};
  auto work = impl->gloo_for(group).allreduce(tensors);
  return Pending([impl, work, tensor, reduced = tensors[0], widen] {
    impl->wait(work, "all-reduce");
    if (widen) tensor.copy_(reduced);
  });
}

void Communicator::all_gather(torch::Tensor& tensor, std::int64_t shard_numel, Group group) {
  FERRY_ASSERT(tensor.is_contiguous() && tensor.dim() == 1 && shard_numel * impl_->world_size >= tensor.numel(),
               "all_gather needs a flat contiguous tensor of at most world_size shards");
  // Gloo gathers bf16 as its fp32 values, which round back exactly.
  const bool widen = !tensor.is_cuda() && tensor.scalar_type() == torch::kBFloat16;
  torch::Tensor whole = widen ? padded(tensor.to(torch::kFloat), shard_numel, impl_->world_size, true)
                              : padded(tensor, shard_numel, impl_->world_size, /*copy=*/true);
  std::vector<at::Tensor> input{whole.narrow(0, impl_->rank * shard_numel, shard_numel).clone()};
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int r = 0; r < impl_->world_size; ++r) outputs[0].push_back(whole.narrow(0, r * shard_numel, shard_numel));
#ifdef FERRY_WITH_NCCL
  if (auto* nccl = impl_->nccl_for(tensor, group)) {
    impl_->wait(nccl->allgather(outputs, input), "all-gather");
  } else {
    impl_->wait(impl_->gloo_for(group).allgather(outputs, input), "all-gather");
  }
#else
  impl_->wait(impl_->gloo_for(group).allgather(outputs, input), "all-gather");
#endif
  if (!whole.is_same(tensor)) tensor.copy_(whole.narrow(0, 0, tensor.numel()));
}

std::vector<std::string> Communicator::all_gather_text(const std::string& text, Group group) {
  const int ranks = impl_->world_size;
  torch::Tensor lengths = torch::zeros({ranks}, torch::kLong);
  lengths[impl_->rank] = static_cast<std::int64_t>(text.size());
  all_reduce_sum(lengths, group);
  const std::int64_t longest = lengths.max().item<std::int64_t>();
  std::vector<std::string> texts(static_cast<std::size_t>(ranks));
  if (longest == 0) return texts;
  torch::Tensor bytes = torch::zeros({ranks * longest}, torch::kByte);
  std::memcpy(bytes.data_ptr<std::uint8_t>() + impl_->rank * longest, text.data(), text.size());
  all_gather(bytes, longest, group);
  for (int r = 0; r < ranks; ++r) {
    texts[static_cast<std::size_t>(r)].assign(reinterpret_cast<const char*>(bytes.data_ptr<std::uint8_t>()) + r * longest,
                                              static_cast<std::size_t>(lengths[r].item<std::int64_t>()));
  }
  return texts;
}

void Communicator::barrier() { impl_->wait(impl_->gloo->barrier(), "barrier"); }

void Communicator::agree(const std::string& what, const std::string& error) {
  const std::string key = "ferry/agree/" + std::to_string(impl_->agreements++) + "/";
  torch::Tensor failed = torch::zeros({impl_->world_size}, torch::kInt);
  if (!error.empty()) {
    failed[impl_->rank] = 1;
    impl_->store->set(key + std::to_string(impl_->rank), std::vector<std::uint8_t>(error.begin(), error.end()));
  }
  all_reduce_sum(failed);
  std::string message;
  for (int r = 0; r < impl_->world_size; ++r) {
    if (failed[r].item<int>() == 0) continue;
    const std::vector<std::uint8_t> text = impl_->store->get(key + std::to_string(r));
    message += detail::concat(message.empty() ? "" : "; ", "rank ", r, ": ", std::string(text.begin(), text.end()));
  }
  FERRY_CHECK(message.empty(), what, " failed on ", message);
}

std::shared_ptr<Communicator> connect(const World& world, const CommunicatorOptions& options) {
  FERRY_CHECK(world.world_size >= 1 && world.rank >= 0 && world.rank < world.world_size, "rank ", world.rank,
              " is not in a world of size ", world.world_size, ": a rank is in [0, world_size)");
  FERRY_CHECK(world.master_port > 0 && world.master_port <= 65535, "master port ", world.master_port,
              " is not in [1, 65535]");
  FERRY_CHECK(options.timeout.count() > 0, "the communicator's timeout must be positive; got ",
              options.timeout.count(), " ms");
  auto impl = std::make_unique<Communicator::Impl>();
  impl->rank = world.rank;
  impl->world_size = world.world_size;
  impl->timeout = options.timeout;
  const std::string where = detail::concat(world.master_addr, ":", world.master_port);
  try {
    c10d::TCPStoreOptions store_options;
    store_options.port = static_cast<std::uint16_t>(world.master_port);
    store_options.isServer = world.rank == 0;
    store_options.numWorkers = static_cast<std::size_t>(world.world_size);
    store_options.timeout = options.timeout;
    impl->store = c10::make_intrusive<c10d::TCPStore>(world.master_addr, store_options);
    auto gloo_options = c10d::ProcessGroupGloo::Options::create(options.timeout);
    gloo_options->devices.push_back(gloo_device(world.master_addr));
    impl->gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(
        c10::make_intrusive<c10d::PrefixStore>("gloo", impl->store), world.rank, world.world_size, gloo_options);
    impl->gloo_update = c10::make_intrusive<c10d::ProcessGroupGloo>(
        c10::make_intrusive<c10d::PrefixStore>("gloo.update", impl->store), world.rank, world.world_size,
        gloo_options);
#ifdef FERRY_WITH_NCCL
    if (options.device.is_cuda()) {
      auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
      nccl_options->timeout = options.timeout;
      impl->nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(
          c10::make_intrusive<c10d::PrefixStore>("nccl", impl->store), world.rank, world.world_size, nccl_options);
      impl->nccl_update = c10::make_intrusive<c10d::ProcessGroupNCCL>(
          c10::make_intrusive<c10d::PrefixStore>("nccl.update", impl->store), world.rank, world.world_size,
          nccl_options);
      impl->backend = "nccl";
    }
#endif
  } catch (const std::exception& e) {
    throw Error(detail::concat("rank ", world.rank, " of ", world.world_size, " could not join the job at ", where,
                               " within ", options.timeout.count() / 1000.0, " s (is rank 0 running, and are ",
                               "MASTER_ADDR and MASTER_PORT the same on every rank?): ", e.what()));
  }
  return std::shared_ptr<Communicator>(new Communicator(std::move(impl)));
}

}  // namespace ferry::dist
