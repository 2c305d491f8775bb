// The communicator over real c10d: a TCPStore and ProcessGroupGloo on loopback, one thread a rank.

#include <stdlib.h>

#include <chrono>

#include <torch/torch.h>

#include "ferry/check.h"
#include "ferry/dist.h"
#include "support/ranks.h"

// glog, which LibTorch includes, defines a CHECK macro of its own; Catch's must win.
#undef CHECK
#include <catch2/catch.hpp>

using namespace ferry;
using namespace ferry::testing;

namespace {

// Sets the variables for the test's lifetime and restores the environment after.
class Environment {
 public:
  Environment(std::vector<std::pair<std::string, std::string>> variables) {
    for (const char* name : {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}) ::unsetenv(name);
    for (const auto& [name, value] : variables) ::setenv(name.c_str(), value.c_str(), 1);
  }
  ~Environment() {
    for (const char* name : {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}) ::unsetenv(name);
  }
};

}  // namespace

TEST_CASE("the world comes from torchrun's variables, and a bad one is named") {
  {
    Environment none({});
    dist::World world = dist::World::from_environment();
    CHECK(world.world_size == 1);
    CHECK(world.rank == 0);
  }
  {
    Environment torchrun({{"RANK", "3"}, {"LOCAL_RANK", "1"}, {"WORLD_SIZE", "4"}, {"MASTER_ADDR", "node0"},
                          {"MASTER_PORT", "29400"}});
    dist::World world = dist::World::from_environment();
    CHECK(world.rank == 3);
    CHECK(world.local_rank == 1);
    CHECK(world.world_size == 4);
    CHECK(world.master_addr == "node0");
    CHECK(world.master_port == 29400);
  }
  {
    Environment bad({{"RANK", "4"}, {"LOCAL_RANK", "0"}, {"WORLD_SIZE", "4"}, {"MASTER_ADDR", "x"},
                     {"MASTER_PORT", "1"}});
    CHECK_THROWS_WITH(dist::World::from_environment(), Catch::Contains("RANK='4'") && Catch::Contains("[0, 3]"));
  }
  {
    Environment missing({{"RANK", "0"}, {"LOCAL_RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "x"}});
    CHECK_THROWS_WITH(dist::World::from_environment(), Catch::Contains("MASTER_PORT"));
  }
  {
    Environment junk({{"RANK", "0"}, {"LOCAL_RANK", "0"}, {"WORLD_SIZE", "two"}});
    CHECK_THROWS_WITH(dist::World::from_environment(), Catch::Contains("WORLD_SIZE='two'"));
  }
}

TEST_CASE("two ranks sum tensors to the same bits and agree on success") {
  std::vector<torch::Tensor> results(2);
  auto errors = run_ranks(2, [&](int rank, std::shared_ptr<dist::Communicator> communicator) {
    REQUIRE(communicator->rank() == rank);
    REQUIRE(communicator->world_size() == 2);
    CHECK(communicator->backend() == "gloo");
    torch::Tensor values = torch::randn({1000}, torch::TensorOptions().dtype(torch::kFloat)) * (rank + 1);
    communicator->all_reduce_sum(values);
    results[static_cast<std::size_t>(rank)] = values;
    communicator->agree("the test");
    communicator->barrier();
  });
  CHECK(errors == std::vector<std::string>{"", ""});
  CHECK(torch::equal(results[0], results[1]));
}

TEST_CASE("a rank's failure is named on every rank") {
  auto errors = run_ranks(2, [&](int rank, std::shared_ptr<dist::Communicator> communicator) {
    communicator->agree("loading", rank == 1 ? "no such file 'x'" : "");
  });
  for (const std::string& error : errors) {
    CHECK_THAT(error, Catch::Contains("loading failed on rank 1: no such file 'x'"));
  }
}

TEST_CASE("a rank that never comes stops the rendezvous at the timeout, naming the address") {
  dist::World world;
  world.world_size = 2;
  world.master_port = free_port();
  dist::CommunicatorOptions options;
  options.timeout = std::chrono::milliseconds(1500);
  const auto start = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH(dist::connect(world, options),
                    Catch::Contains("rank 0 of 2 could not join") && Catch::Contains("127.0.0.1:"));
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(20));
}

TEST_CASE("reduce-scatter sums each rank's shard and all-gather fills every shard, padded") {
  // 5 elements in shards of 3: rank 1's is [3, 5), shorter than the others', as an engine part's may be.
  constexpr std::int64_t kNumel = 5, kShard = 3;
  std::vector<torch::Tensor> reduced(2), gathered(2);
  auto errors = run_ranks(2, [&](int rank, std::shared_ptr<dist::Communicator> communicator) {
    torch::Tensor values = torch::arange(kNumel, torch::kFloat) * (rank + 1);
    communicator->reduce_scatter_sum(values, kShard);
    reduced[static_cast<std::size_t>(rank)] = values.narrow(0, rank * kShard, rank == 0 ? kShard : kNumel - kShard).clone();
    // Each rank's shard holds its own marks; the others' are overwritten by the gather.
    torch::Tensor marks = torch::full({kNumel}, -1.0f);
    marks.narrow(0, rank * kShard, rank == 0 ? kShard : kNumel - kShard).fill_(static_cast<float>(rank + 10));
    communicator->all_gather(marks, kShard, dist::Group::kUpdate);
    gathered[static_cast<std::size_t>(rank)] = marks;
  });
  REQUIRE(errors == std::vector<std::string>{"", ""});
  CHECK(torch::equal(reduced[0], torch::tensor({0.0f, 3.0f, 6.0f})));
  CHECK(torch::equal(reduced[1], torch::tensor({9.0f, 12.0f})));
  const torch::Tensor expected = torch::tensor({10.0f, 10.0f, 10.0f, 11.0f, 11.0f});
  CHECK(torch::equal(gathered[0], expected));
  CHECK(torch::equal(gathered[1], expected));
}

TEST_CASE("reductions started together complete in any order of waiting, bf16 included, and texts gather") {
  // Catch's assertions are not for threads: each rank records, the test checks after.
  std::vector<torch::Tensor> first(2), second(2);
  std::vector<std::vector<std::string>> texts(2);
  std::vector<int> pending_before(2), pending_after(2);
  auto errors = run_ranks(2, [&](int rank, std::shared_ptr<dist::Communicator> communicator) {
    const auto r = static_cast<std::size_t>(rank);
    torch::Tensor a = torch::arange(6, torch::kFloat) + rank;
    torch::Tensor b = (torch::arange(4, torch::kFloat) * (rank + 1)).to(torch::kBFloat16);
    dist::Pending reducing_a = communicator->start_reduce_scatter_sum(a, 3);
    dist::Pending reducing_b = communicator->start_reduce_scatter_sum(b, 2);
    pending_before[r] = reducing_a.pending();
    reducing_b.wait();
    reducing_a.wait();
    reducing_a.wait();  // a second wait returns at once
    pending_after[r] = reducing_a.pending();
    texts[r] = communicator->all_gather_text(rank == 0 ? "rank zero" : "");
    first[r] = a.narrow(0, rank * 3, 3).clone();
    second[r] = b.narrow(0, rank * 2, 2).to(torch::kFloat);
  });
  REQUIRE(errors == std::vector<std::string>{"", ""});
  CHECK(pending_before == std::vector<int>{1, 1});
  CHECK(pending_after == std::vector<int>{0, 0});
  for (const auto& gathered : texts) CHECK(gathered == std::vector<std::string>{"rank zero", ""});
  CHECK(torch::equal(first[0], torch::tensor({1.0f, 3.0f, 5.0f})));
  CHECK(torch::equal(first[1], torch::tensor({7.0f, 9.0f, 11.0f})));
  CHECK(torch::equal(second[0], torch::tensor({0.0f, 3.0f})));
  CHECK(torch::equal(second[1], torch::tensor({6.0f, 9.0f})));
}
