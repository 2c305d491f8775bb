#pragma once

// Measuring pieces that calibration and the bench commands share: timing with medians, and moving
// a file through the I/O engine.

#include <chrono>
#include <cstdint>
#include <functional>

#include "ferry/io.h"

namespace ferry::measure {

double seconds_since(std::chrono::steady_clock::time_point start);
double gbps(std::uint64_t bytes, double seconds);

// Seconds of `repeats` runs of body after one untimed warm-up run, fastest first.
std::vector<double> sorted_seconds(int repeats, const std::function<void()>& body);
double median_seconds(int repeats, const std::function<void()>& body);
// The median of `repeat` figures: the disk behind a VM drifts from run to run.
double median_of(unsigned repeat, const std::function<double()>& measure);

// Moves the whole file through the engine, `buffer_bytes` per request, all requests in flight at
// once so the engine's queue depth is the only limit. GB/s.
double engine_gbps(IoEngine& engine, StripedFile& file, IoOp op, char* buffer, std::size_t buffer_bytes,
                   std::uint64_t file_bytes);

}  // namespace ferry::measure
