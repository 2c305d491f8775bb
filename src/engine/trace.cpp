#include "engine/trace.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "ferry/check.h"

namespace ferry::detail {
namespace {

using Interval = std::pair<double, double>;

const char* track_name(Track track) {
  switch (track) {
    case Track::kCompute: return "compute";
    case Track::kGradientsDown: return "gradients down";
    case Track::kOptimizer: return "CPU optimizer";
  }
  return "?";
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

void Tracer::write(const std::string& path) const {
  nlohmann::json events = nlohmann::json::array();
  std::lock_guard<std::mutex> lock(mutex_);
  for (Track track : {Track::kCompute, Track::kGradientsDown, Track::kOptimizer}) {
    events.push_back({{"ph", "M"}, {"name", "thread_name"}, {"pid", 1},
                      {"tid", static_cast<int>(track)}, {"args", {{"name", track_name(track)}}}});
  }
  for (const Span& span : spans_) {
    events.push_back({{"ph", "X"}, {"name", span.name}, {"cat", track_name(span.track)}, {"pid", 1},
                      {"tid", static_cast<int>(span.track)}, {"ts", span.start_us},
                      {"dur", span.end_us - span.start_us}});
  }
  std::ofstream out(path);
  out << nlohmann::json{{"traceEvents", events}, {"displayTimeUnit", "ms"}}.dump() << "\n";
  FERRY_CHECK(out.good(), "cannot write the trace to '", path, "'");
}

std::string Tracer::overlap_summary() const {
  std::vector<Interval> by_track[3];
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const Span& span : spans_) by_track[static_cast<int>(span.track)].push_back({span.start_us, span.end_us});
  }
  const std::vector<Interval> compute = merged(by_track[0]);
  const std::vector<Interval> down = merged(by_track[1]);
  const std::vector<Interval> optimizer = merged(by_track[2]);
  const double optimizer_us = total(optimizer);
  const double hidden_us = intersection(optimizer, compute);
  char text[256];
  std::snprintf(text, sizeof text,
                "compute %.2f s, gradients down %.2f s, CPU optimizer %.2f s of which %.2f s (%.0f%%) "
                "overlapped compute",
                total(compute) / 1e6, total(down) / 1e6, optimizer_us / 1e6, hidden_us / 1e6,
                optimizer_us > 0 ? 100 * hidden_us / optimizer_us : 0.0);
  return text;
}

}  // namespace ferry::detail
