#pragma once

// A world of ranks inside one test: each rank a thread with its own Communicator, joined over a
// real c10d TCPStore and ProcessGroupGloo on loopback, at a port that was free a moment before.

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "ferry/dist.h"

namespace ferry::testing {

// A TCP port on loopback that nothing listens on (the kernel's choice of an ephemeral one).
inline int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error("socket() failed");
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(address);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    ::close(fd);
    throw std::runtime_error("cannot bind a loopback port");
  }
  ::close(fd);
  return ntohs(address.sin_port);
}

// Runs body(rank, communicator) on `world_size` threads at once and returns each rank's error
// ("" where the body returned).
inline std::vector<std::string> run_ranks(
    int world_size, const std::function<void(int, std::shared_ptr<dist::Communicator>)>& body,
    std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
  const int port = free_port();
  std::vector<std::string> errors(static_cast<std::size_t>(world_size));
  std::vector<std::thread> threads;
  for (int rank = 0; rank < world_size; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        dist::World world;
        world.rank = rank;
        world.local_rank = rank;
        world.world_size = world_size;
        world.master_port = port;
        dist::CommunicatorOptions options;
        options.timeout = timeout;
        body(rank, dist::connect(world, options));
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(rank)] = e.what();
        if (errors[static_cast<std::size_t>(rank)].empty()) errors[static_cast<std::size_t>(rank)] = "(an empty error)";
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  return errors;
}

}  // namespace ferry::testing
