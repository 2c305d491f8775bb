#pragma once

// Data parallelism inside the engine (docs/distributed.md): what both trainers need of
// EngineConfig::communicator. Without one, a world of one rank and no collectives.

#include <exception>
#include <string>
#include <vector>

#include <torch/types.h>

#include "ferry/dist.h"
#include "ferry/engine.h"

namespace ferry::detail {

int world_size(const EngineConfig& config);
int rank(const EngineConfig& config);

// One rank of a world: the one whose share a set-up lays out (the engine's own), or sizes (the
// planner's rank 0 of a planned world, whose shards are the largest).
struct Ranks {
  int rank = 0;
  int world_size = 1;
};
Ranks ranks_of(const EngineConfig& config);

// Sums `tensor` over the ranks in place; every rank ends with the same bits.
void sum_across_ranks(const EngineConfig& config, torch::Tensor& tensor);


// This rank's part of a flat range of `numel` elements (ZeRO's partition): an even split into
// world_size shards of `padded` elements each, the last ones clipped to the range, so a shard
// may be shorter than `padded` or empty. A world of one owns everything.
struct Shard {
  std::int64_t begin = 0;
  std::int64_t numel = 0;
  std::int64_t padded = 0;
};
Shard shard_of(const Ranks& ranks, std::int64_t numel);

// Every rank must issue the same collectives in the same order: throws ferry::Error on every
// rank, naming each rank whose mode, micro-batches, their order, zo2 samples or model size differ
// from the others' (a plan chosen per rank from its own measurements may).
void require_same_schedule(const EngineConfig& config, std::int64_t parameter_count);

// The name of this rank's file in a directory the ranks may share: `name` alone in a world of
// one, "<stem>.rank<r><extension>" otherwise.
std::string rank_file_name(const EngineConfig& config, const std::string& name);

// Runs `f`; with a communicator, every rank then learns whether it succeeded everywhere, and a
// rank that succeeded throws ferry::Error naming each rank that failed (the failed ones rethrow
// their own error). So one rank's failure stops every rank instead of hanging them at their next
// collective.
template <typename F>
void on_every_rank(dist::Communicator* communicator, const char* what, F f) {
  if (!communicator || communicator->world_size() == 1) return f();
  std::exception_ptr failure;
  std::string error;
  try {
    f();
  } catch (const std::exception& e) {
    failure = std::current_exception();
    error = e.what();
  }
  try {
    communicator->agree(what, error);
  } catch (const Error&) {
    if (failure) std::rethrow_exception(failure);
    throw;
  }
}

}  // namespace ferry::detail
