#pragma once

// Spans of a training run for chrome://tracing (or Perfetto): compute per part on the calling
// thread, gradients going down, and the CPU optimizer on the worker, with a summary of how much
// of the optimizer's time was hidden behind compute.

#include <chrono>
#include <mutex>
#include <string>
#include <vector>

namespace ferry::detail {

enum class Track { kCompute = 0, kGradientsDown = 1, kOptimizer = 2 };

class Tracer {
 public:
  using Clock = std::chrono::steady_clock;

  explicit Tracer(bool enabled) : enabled_(enabled), origin_(Clock::now()) {}
  bool enabled() const { return enabled_; }

  void record(std::string name, Track track, Clock::time_point start, Clock::time_point end);
  // Writes the Chrome trace JSON; throws ferry::Error when the file cannot be written.
  void write(const std::string& path) const;
  // "compute 3.2 s, CPU optimizer 1.1 s, of which 0.9 s (82%) overlapped compute; ..."
  std::string overlap_summary() const;

 private:
  struct Span {
    std::string name;
    Track track;
    double start_us;
    double end_us;
  };

  const bool enabled_;
  const Clock::time_point origin_;
  mutable std::mutex mutex_;
  std::vector<Span> spans_;
};

}  // namespace ferry::detail
