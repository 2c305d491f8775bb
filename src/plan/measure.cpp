#include "plan/measure.h"

#include <algorithm>
#include <vector>

namespace ferry::measure {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double gbps(std::uint64_t bytes, double seconds) { return static_cast<double>(bytes) / seconds / 1e9; }

std::vector<double> sorted_seconds(int repeats, const std::function<void()>& body) {
  body();
  std::vector<double> seconds;
  for (int i = 0; i < repeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    body();
    seconds.push_back(seconds_since(start));
  }
  std::sort(seconds.begin(), seconds.end());
  return seconds;
}

double median_seconds(int repeats, const std::function<void()>& body) {
  const std::vector<double> seconds = sorted_seconds(repeats, body);
  return seconds[seconds.size() / 2];
}

double median_of(unsigned repeat, const std::function<double()>& measure) {
  std::vector<double> runs;
  for (unsigned i = 0; i < repeat; ++i) runs.push_back(measure());
  std::sort(runs.begin(), runs.end());
  return runs[runs.size() / 2];
}

double engine_gbps(IoEngine& engine, StripedFile& file, IoOp op, char* buffer, std::size_t buffer_bytes,
                   std::uint64_t file_bytes) {
  auto start = std::chrono::steady_clock::now();
  std::vector<IoTicket> tickets;
  for (std::uint64_t offset = 0; offset < file_bytes; offset += buffer_bytes) {
    const std::size_t length = static_cast<std::size_t>(std::min<std::uint64_t>(buffer_bytes, file_bytes - offset));
    tickets.push_back(op == IoOp::kRead ? engine.read(file, offset, buffer, length)
                                        : engine.write(file, offset, buffer, length));
  }
  for (const IoTicket& ticket : tickets) ticket.wait();
  if (op == IoOp::kWrite) file.sync();
  return gbps(file_bytes, seconds_since(start));
}

}  // namespace ferry::measure
