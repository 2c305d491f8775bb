// `ferry launch`: torchrun's single-host launch for ferry's own commands. It starts N copies of
// a ferry command with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set as torchrun
// sets them, waits for them, and stops the others when one fails (docs/distributed.md).

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cxxopts.hpp>
#include <iostream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "cli/command.h"
#include "ferry/check.h"
#include "ferry/job.h"

namespace ferry::cli {
namespace {

volatile sig_atomic_t g_stop_signal = 0;

void record_stop(int signal) { g_stop_signal = signal; }

// A TCP port on this host that nothing listens on now (the kernel's choice for port 0).
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  FERRY_CHECK(fd >= 0, "launch: cannot open a socket to find a free port: ", std::strerror(errno));
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t size = sizeof address;
  const bool found = ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0 &&
                     ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &size) == 0;
  const int error = errno;
  ::close(fd);
  FERRY_CHECK(found, "launch: cannot find a free port: ", std::strerror(error));
  return ntohs(address.sin_port);
}

// The exit code of a process as a shell reports it: its own, or 128 + the signal that ended it.
int exit_code(int status) { return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status); }

struct Rank {
  pid_t pid = -1;
  bool running = false;
};

// Note: the child only calls execve (async-signal-safe) after fork: its arguments and
// environment are made before, since the parent may have threads (LibTorch's) holding locks.
pid_t start_rank(const std::vector<std::string>& command, int rank, int ranks, const std::string& addr, int port) {
  std::vector<std::string> environment;
  const std::vector<std::pair<std::string, std::string>> variables = {
      {"RANK", std::to_string(rank)},          {"LOCAL_RANK", std::to_string(rank)},
      {"WORLD_SIZE", std::to_string(ranks)},   {"LOCAL_WORLD_SIZE", std::to_string(ranks)},
      {"MASTER_ADDR", addr},                   {"MASTER_PORT", std::to_string(port)}};
  for (char** entry = environ; *entry != nullptr; ++entry) {
    const std::string text = *entry;
    const std::string name = text.substr(0, text.find('='));
    bool replaced = false;
    for (const auto& variable : variables) replaced = replaced || variable.first == name;
    if (!replaced) environment.push_back(text);
  }
  for (const auto& [name, value] : variables) environment.push_back(name + "=" + value);
  std::vector<char*> envp, argv;
  for (std::string& entry : environment) envp.push_back(entry.data());
  envp.push_back(nullptr);
  std::string program = "ferry";
  argv.push_back(program.data());
  std::vector<std::string> words = command;
  for (std::string& word : words) argv.push_back(word.data());
  argv.push_back(nullptr);
  static const char kExecFailed[] = "launch: a rank could not start ferry (/proc/self/exe)\n";

  const pid_t pid = ::fork();
  FERRY_CHECK(pid >= 0, "launch: fork failed: ", std::strerror(errno));
  if (pid > 0) return pid;
  ::execve("/proc/self/exe", argv.data(), envp.data());
  (void)!::write(STDERR_FILENO, kExecFailed, sizeof kExecFailed - 1);
  ::_exit(127);
}

void signal_running(std::vector<Rank>& ranks, int signal) {
  for (Rank& rank : ranks) {
    if (rank.running) ::kill(rank.pid, signal);
  }
}

// Waits for every rank. The first to fail (or a stop signal to the launcher) has the others sent
// SIGTERM, which ferry finetune takes as a stop request, and SIGKILL after `grace`.
int wait_for_ranks(std::vector<Rank>& ranks, std::chrono::seconds grace) {
  int result = 0;
  std::optional<std::chrono::steady_clock::time_point> stopping_since;
  auto stop = [&](int signal) {
    if (stopping_since) return;
    signal_running(ranks, signal);
    stopping_since = std::chrono::steady_clock::now();
  };
  auto any_running = [&] {
    return std::any_of(ranks.begin(), ranks.end(), [](const Rank& rank) { return rank.running; });
  };
  while (any_running()) {
    if (g_stop_signal != 0) stop(g_stop_signal);
    if (stopping_since && std::chrono::steady_clock::now() - *stopping_since > grace) signal_running(ranks, SIGKILL);
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid <= 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      continue;
    }
    const auto rank = std::find_if(ranks.begin(), ranks.end(), [&](const Rank& r) { return r.pid == pid; });
    if (rank == ranks.end()) continue;
    rank->running = false;
    const int code = exit_code(status);
    if (code == 0 || result != 0) continue;
    result = code;
    std::fprintf(stderr, "launch: rank %td exited with %d; stopping the others\n", rank - ranks.begin(), code);
    stop(SIGTERM);
  }
  return g_stop_signal != 0 && result == 0 ? 128 + g_stop_signal : result;
}

int run_launch(int argc, char** argv) {
  int split = argc;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--") {
      split = i;
      break;
    }
  }
  cxxopts::Options options(argv[0], "Run a ferry command as N data-parallel processes on this host, with torchrun's "
                                    "variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): "
                                    "ferry launch --nproc-per-node 2 -- finetune --model ... (each rank on "
                                    "cuda:LOCAL_RANK; --batch is per rank)");
  options.add_options()
      ("nproc-per-node", "processes (ranks) to start, one per GPU, in [1, 1024]",
       cxxopts::value<std::string>()->default_value("1"))
      ("master-addr", "the address rank 0 serves the rendezvous on", cxxopts::value<std::string>()->default_value("127.0.0.1"))
      ("master-port", "its TCP port in [0, 65535]; 0: a free one", cxxopts::value<std::string>()->default_value("29500"))
      ("stop-grace", "seconds the other ranks have to stop after one fails, before they are killed",
       cxxopts::value<std::string>()->default_value("30"))
      ("h,help", "show this help");
  auto args = options.parse(split, argv);
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    return 0;
  }
  FERRY_CHECK(std::getenv("WORLD_SIZE") == nullptr, "launch: WORLD_SIZE is set already (", std::getenv("WORLD_SIZE"),
              "): this is a launched process; run the command itself");
  std::vector<std::string> command(argv + std::min(split + 1, argc), argv + argc);
  FERRY_CHECK(!command.empty(), "launch needs the command to run after --: ferry launch --nproc-per-node 2 -- "
                                "finetune --model ...");
  const auto ranks = static_cast<int>(parse_integer(args["nproc-per-node"].as<std::string>(), "--nproc-per-node", 1, 1024));
  const auto grace = parse_integer(args["stop-grace"].as<std::string>(), "--stop-grace", 0, 24 * 3600);
  int port = static_cast<int>(parse_integer(args["master-port"].as<std::string>(), "--master-port", 0, 65535));
  if (port == 0) port = free_port();
  const std::string addr = args["master-addr"].as<std::string>();
  std::fprintf(stderr, "launch: %d rank%s of 'ferry %s', MASTER_ADDR=%s MASTER_PORT=%d\n", ranks, ranks == 1 ? "" : "s",
               command.front().c_str(), addr.c_str(), port);

  struct sigaction action{};
  action.sa_handler = record_stop;
  sigemptyset(&action.sa_mask);
  ::sigaction(SIGINT, &action, nullptr);
  ::sigaction(SIGTERM, &action, nullptr);
  std::fflush(nullptr);
  std::vector<Rank> started;
  for (int r = 0; r < ranks; ++r) started.push_back({start_rank(command, r, ranks, addr, port), true});
  return wait_for_ranks(started, std::chrono::seconds(grace));
}

}  // namespace

FERRY_CLI_COMMAND("launch", "run a ferry command as N data-parallel processes, as torchrun does", run_launch);

}  // namespace ferry::cli
