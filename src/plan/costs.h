#pragma once

// What one block and the head cost in memory and FLOPs for one micro-batch, read off the
// families' forward code (src/model/families.cpp): which tensors autograd saves, which live
// together. Free of torch, like the ModelConfig it reads.

#include <cstdint>

#include "ferry/model_config.h"

namespace ferry::detail {

struct ActivationShape {
  std::int64_t batch = 1;
  std::int64_t seq = 1;
  std::uint64_t element_size = 2;  // the compute precision's
  bool fused_attention = true;     // SDPA kernels; false: scores and softmax in memory
};

struct BlockCosts {
  std::uint64_t checkpoint_bytes = 0;  // the block's input: all a recomputed block keeps
  std::uint64_t graph_bytes = 0;       // what autograd saves for the block's backward, input included
  std::uint64_t forward_working_bytes = 0;   // live intermediates of a forward without a graph
  std::uint64_t backward_working_bytes = 0;  // gradients of intermediates during its backward
  double forward_flops = 0;            // matmuls and attention, one forward
};

struct HeadCosts {
  std::uint64_t saved_bytes = 0;  // kept from the head's forward to its backward (norm, log-softmax)
  std::uint64_t peak_bytes = 0;   // the most the head and loss hold at once, forward or backward
  std::uint64_t forward_logits_bytes = 0;  // logits and loss temporaries of a forward without a graph
  double forward_flops = 0;
};

BlockCosts block_costs(const models::ModelConfig& config, const ActivationShape& shape);
HeadCosts head_costs(const models::ModelConfig& config, const ActivationShape& shape);

}  // namespace ferry::detail
