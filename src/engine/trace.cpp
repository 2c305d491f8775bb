#include "engine/trace.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "ferry/check.h"
#include "ferry/io.h"

namespace ferry::detail {
namespace {

using Interval = std::pair<double, double>;

const char* track_name(Track track) {
  switch (track) {
    case Track::kCompute: return "compute";
    case Track::kGradientsDown: return "gradients down";
    case Track::kOptimizer: return "CPU optimizer";
    case Track::kHostToGpu: return "host -> gpu";
    case Track::kGpuToHost: return "gpu -> host";
    case Track::kNvmeToHost: return "nvme -> host";
    case Track::kHostToNvme: return "host -> nvme";
  }
  return "?";
}

Track transfer_track(Tier from, Tier to) {
  if (to == Tier::kGpu) return Track::kHostToGpu;
  if (from == Tier::kGpu) return Track::kGpuToHost;
  return from == Tier::kNvme ? Track::kNvmeToHost : Track::kHostToNvme;
}

// The union of intervals, merged and sorted.
std::vector<Interval> merged(std::vector<Interval> intervals) {
  std::sort(intervals.begin(), intervals.end());
  std::vector<Interval> out;
  for (const Interval& interval : intervals) {
    if (!out.empty() && interval.first <= out.back().second) {
      out.back().second = std::max(out.back().second, interval.second);
    } else {
      out.push_back(interval);
    }
  }
  return out;
}

double total(const std::vector<Interval>& intervals) {
  double sum = 0;
  for (const Interval& interval : intervals) sum += interval.second - interval.first;
  return sum;
}

double intersection(const std::vector<Interval>& a, const std::vector<Interval>& b) {
  double sum = 0;
  std::size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    sum += std::max(0.0, std::min(a[i].second, b[j].second) - std::max(a[i].first, b[j].first));
    (a[i].second < b[j].second) ? ++i : ++j;
  }
  return sum;
}

}  // namespace

void Tracer::record(std::string name, Track track, Clock::time_point start, Clock::time_point end) {
  if (!enabled_) return;
  auto micros = [this](Clock::time_point t) {
    return std::chrono::duration<double, std::micro>(t - origin_).count();
  };
  std::lock_guard<std::mutex> lock(mutex_);
  spans_.push_back({std::move(name), track, micros(start), micros(end)});
}

void Tracer::record(const TransferSpan& span) {
  record(span.bundle, transfer_track(span.from, span.to), span.start, span.end);
}

void Tracer::write(const std::string& path) const {
  nlohmann::json events = nlohmann::json::array();
  std::lock_guard<std::mutex> lock(mutex_);
  for (int t = 0; t < kTrackCount; ++t) {
    const auto track = static_cast<Track>(t);
    events.push_back({{"ph", "M"}, {"name", "thread_name"}, {"pid", 1},
                      {"tid", static_cast<int>(track)}, {"args", {{"name", track_name(track)}}}});
  }
  for (const Span& span : spans_) {
    events.push_back({{"ph", "X"}, {"name", span.name}, {"cat", track_name(span.track)}, {"pid", 1},
                      {"tid", static_cast<int>(span.track)}, {"ts", span.start_us},
                      {"dur", span.end_us - span.start_us}});
  }
  write_file_durably(Env::posix(), path,
                     nlohmann::json{{"traceEvents", events}, {"displayTimeUnit", "ms"}}.dump() + "\n");
}

void trace_transfers(StoreOptions& options, const std::shared_ptr<Tracer>& tracer) {
  if (!tracer->enabled()) return;
  options.on_transfer = [tracer](const TransferSpan& span) { tracer->record(span); };
}

std::string Tracer::overlap_summary() const {
  std::vector<Interval> by_track[kTrackCount];
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const Span& span : spans_) by_track[static_cast<int>(span.track)].push_back({span.start_us, span.end_us});
  }
  const std::vector<Interval> compute = merged(by_track[static_cast<int>(Track::kCompute)]);
  char text[160];
  std::snprintf(text, sizeof text, "compute %.2f s", total(compute) / 1e6);
  std::string summary = text;
  for (int t = 1; t < kTrackCount; ++t) {
    const std::vector<Interval> spans = merged(by_track[t]);
    const double busy_us = total(spans);
    if (busy_us == 0 && t != static_cast<int>(Track::kOptimizer)) continue;
    const double hidden_us = intersection(spans, compute);
    std::snprintf(text, sizeof text, ", %s %.2f s of which %.2f s (%.0f%%) overlapped compute",
                  track_name(static_cast<Track>(t)), busy_us / 1e6, hidden_us / 1e6,
                  busy_us > 0 ? 100 * hidden_us / busy_us : 0.0);
    summary += text;
  }
  return summary;
}

}  // namespace ferry::detail
