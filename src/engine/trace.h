#pragma once

// Spans of a training run for chrome://tracing (or Perfetto): compute per part on the calling
// thread, gradients going down, the CPU optimizer (or zo2's host encoder) on its worker, and the
// store's transfers per tier pair, with a summary of how much of each was hidden behind compute.

#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ferry/store.h"

namespace ferry::detail {

enum class Track {
  kCompute = 0,
  kGradientsDown,
  kOptimizer,
  kHostToGpu,
  kGpuToHost,
  kNvmeToHost,
  kHostToNvme,
};
constexpr int kTrackCount = 7;

class Tracer {
 public:
  using Clock = std::chrono::steady_clock;

  explicit Tracer(bool enabled) : enabled_(enabled), origin_(Clock::now()) {}
  bool enabled() const { return enabled_; }

  void record(std::string name, Track track, Clock::time_point start, Clock::time_point end);
  // A store transfer's hop, on its tier pair's track (StoreOptions::on_transfer).
  void record(const TransferSpan& span);
  // Writes the Chrome trace JSON; throws ferry::Error when the file cannot be written.
  void write(const std::string& path) const;
  // "compute 3.2 s, CPU optimizer 1.1 s of which 0.9 s (82%) overlapped compute, host -> gpu
  // ...": every track with spans, and how much of each overlapped compute.
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

// Has the store report its transfers to `tracer`, when it is enabled.
void trace_transfers(StoreOptions& options, const std::shared_ptr<Tracer>& tracer);

}  // namespace ferry::detail
