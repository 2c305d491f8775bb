// `ferry bench io`: sweeps queue depth and block size for reads and writes with each backend
// and, in the same run, measures a plain sequential O_DIRECT pread/pwrite loop at 1 MiB, the
// baseline every figure is a ratio to.

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <cxxopts.hpp>
#include <iostream>

#include "cli/command.h"
#include "plan/measure.h"
#include "ferry/io.h"
#include "ferry/job.h"
#include "ferry/memory.h"

namespace ferry::cli {
namespace {

constexpr size_t kBaselineBlock = size_t{1} << 20;

// The baseline: one thread, one 1 MiB pread or pwrite after another, O_DIRECT.
// Note: it walks through the whole buffer like the engine does. Reading into the same 1 MiB
// over and over keeps the destination in the CPU caches, which on a virtio disk (the host
// copies into guest memory) made the loop look 40% faster than any real transfer.
double plain_loop_gbps(const std::string& path, IoOp op, char* buffer, size_t buffer_bytes,
                       uint64_t file_bytes) {
  int fd = ::open(path.c_str(), (op == IoOp::kRead ? O_RDONLY : O_WRONLY) | O_DIRECT);
  FERRY_CHECK(fd >= 0, "cannot open ", path, " with O_DIRECT for the baseline: ",
              std::strerror(errno), "; pass a --path on a disk that supports O_DIRECT");
  auto start = std::chrono::steady_clock::now();
  for (uint64_t offset = 0; offset < file_bytes; offset += kBaselineBlock) {
    char* at = buffer + offset % buffer_bytes;
    ssize_t moved = op == IoOp::kRead ? ::pread(fd, at, kBaselineBlock, static_cast<off_t>(offset))
                                      : ::pwrite(fd, at, kBaselineBlock, static_cast<off_t>(offset));
    FERRY_CHECK(moved == static_cast<ssize_t>(kBaselineBlock), "baseline ",
                op == IoOp::kRead ? "pread" : "pwrite", " at offset ", offset, " of ", path,
                " failed: ", moved < 0 ? std::strerror(errno) : "short transfer");
  }
  if (op == IoOp::kWrite) ::fdatasync(fd);
  double seconds = measure::seconds_since(start);
  ::close(fd);
  return measure::gbps(file_bytes, seconds);
}

std::vector<size_t> parse_sizes(const std::vector<std::string>& texts) {
  std::vector<size_t> sizes;
  for (const std::string& text : texts) sizes.push_back(parse_bytes(text));
  return sizes;
}

struct Row {
  IoBackendKind kind;
  unsigned depth;
  size_t block;
  double read_gbps;
  double write_gbps;
};

int run_bench_io(int argc, char** argv) {
  cxxopts::Options options(argv[0], "Measure ferry's I/O engine against a plain O_DIRECT loop");
  options.add_options()
      ("path", "directory on the disk to measure", cxxopts::value<std::string>()->default_value("."))
      ("size", "bytes per pass, a size such as 1GiB", cxxopts::value<std::string>()->default_value("1GiB"))
      ("depths", "I/O requests in flight to sweep, comma-separated (1 to 4096 each)",
       cxxopts::value<std::vector<std::string>>()->default_value("1,4,8,16,32"))
      ("blocks", "bytes per request to sweep, comma-separated sizes (4KiB or more)", cxxopts::value<std::vector<std::string>>()->default_value("256KiB,1MiB,4MiB"))
      ("backends", "backends to sweep: io_uring, libaio, threads", cxxopts::value<std::vector<std::string>>()->default_value("io_uring,libaio,threads"))
      ("repeat", "runs per figure, 1 or more; the median is printed", cxxopts::value<std::string>()->default_value("3"))
      ("h,help", "show this help");
  auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    return 0;
  }
  const std::string directory = args["path"].as<std::string>();
  const uint64_t file_bytes = parse_bytes(args["size"].as<std::string>()) / kBaselineBlock * kBaselineBlock;
  FERRY_CHECK(file_bytes >= kBaselineBlock, "--size must be at least 1 MiB; got ",
              args["size"].as<std::string>());
  FERRY_CHECK(supports_direct_io(directory), "directory '", directory,
              "' does not support O_DIRECT (tmpfs?): bench io measures the disk, so pass a --path on it");
  const size_t buffer_bytes = static_cast<size_t>(std::min<uint64_t>(file_bytes, uint64_t{256} << 20));
  const std::string path = directory + "/ferry-bench-io.dat";

  HostArena arena({.budget_bytes = buffer_bytes, .chunk_bytes = std::min(buffer_bytes, size_t{1} << 30),
                   .name = "bench"});
  HostBlock buffer = arena.allocate(buffer_bytes);
  std::memset(buffer.data(), 0xa5, buffer.bytes());
  {
    auto file = StripedFile::open(Env::posix(), path, OpenMode::kCreate);
    file->members()[0]->allocate(file_bytes);
  }

  std::printf("bench io: %s, %.2f GiB per pass, baseline: one thread, sequential O_DIRECT 1 MiB\n",
              directory.c_str(), static_cast<double>(file_bytes) / (1 << 30));
  const auto repeat = static_cast<unsigned>(parse_integer(args["repeat"].as<std::string>(), "--repeat", 1, 1000));
  auto baseline = [&](IoOp op) {
    return measure::median_of(repeat, [&] {
      return plain_loop_gbps(path, op, buffer.as<char>(), buffer_bytes, file_bytes);
    });
  };
  double base_write = baseline(IoOp::kWrite);
  double base_read = baseline(IoOp::kRead);
  std::printf("baseline: read %.2f GB/s, write %.2f GB/s (median of %u)\n\n", base_read,
              base_write, repeat);
  std::printf("%-9s %5s %9s %10s %7s %10s %7s\n", "backend", "depth", "block", "read GB/s",
              "x base", "write GB/s", "x base");

  std::vector<Row> rows;
  for (const std::string& name : args["backends"].as<std::vector<std::string>>()) {
    for (const std::string& depth_text : args["depths"].as<std::vector<std::string>>()) {
      const auto depth = static_cast<unsigned>(parse_integer(depth_text, "--depths", 1, 4096));
      for (size_t block : parse_sizes(args["blocks"].as<std::vector<std::string>>())) {
        IoOptions io;
        io.backend = parse_io_backend(name);
        io.queue_depth = depth;
        io.block_bytes = block;
        auto engine = IoEngine::create(io);
        engine->register_buffer(buffer.data(), buffer.bytes());
        auto file = StripedFile::open(Env::posix(), path, OpenMode::kReadWrite);
        Row row{io.backend.value(), depth, block, 0, 0};
        auto measure = [&](IoOp op) {
          return measure::median_of(repeat, [&] {
            return measure::engine_gbps(*engine, *file, op, buffer.as<char>(), buffer_bytes, file_bytes);
          });
        };
        row.write_gbps = measure(IoOp::kWrite);
        row.read_gbps = measure(IoOp::kRead);
        engine->unregister_buffer(buffer.data());
        std::printf("%-9s %5u %9s %10.2f %7.2f %10.2f %7.2f\n", name.c_str(), depth,
                    format_bytes(block).c_str(), row.read_gbps, row.read_gbps / base_read,
                    row.write_gbps, row.write_gbps / base_write);
        std::fflush(stdout);
        rows.push_back(row);
      }
    }
  }
  ::unlink(path.c_str());

  auto best = [&](double Row::*figure) {
    return *std::max_element(rows.begin(), rows.end(),
                             [&](const Row& a, const Row& b) { return a.*figure < b.*figure; });
  };
  // The configuration ferry runs with when nobody tunes it.
  const IoOptions defaults;
  const IoBackendKind default_kind = IoEngine::create()->kind();
  auto is_default = [&](const Row& row) {
    return row.kind == default_kind && row.depth == defaults.queue_depth &&
           row.block == defaults.block_bytes;
  };
  auto default_row = std::find_if(rows.begin(), rows.end(), is_default);
  for (auto [label, figure, base] : {std::tuple{"read", &Row::read_gbps, base_read},
                                     std::tuple{"write", &Row::write_gbps, base_write}}) {
    Row top = best(figure);
    std::printf("best %-5s: %.2f GB/s = %.2fx the plain loop (%s, depth %u, %s blocks)\n", label,
                top.*figure, top.*figure / base, to_string(top.kind), top.depth,
                format_bytes(top.block).c_str());
    if (default_row != rows.end()) {
      std::printf("  default (%s, depth %u, %s): %.2f GB/s = %.2fx the plain loop, %.0f%% of the best\n",
                  to_string(default_kind), defaults.queue_depth,
                  format_bytes(defaults.block_bytes).c_str(), (*default_row).*figure,
                  (*default_row).*figure / base, 100 * (*default_row).*figure / top.*figure);
    }
  }
  return 0;
}

}  // namespace

FERRY_CLI_COMMAND("bench io", "sweep I/O backends, queue depths and block sizes against plain O_DIRECT", run_bench_io);

}  // namespace ferry::cli
