// One step replayed on six resources (seven with several ranks: their collectives). A task starts once its inputs are ready, in the first gap
// of its resource that holds it: transfers and updates are issued ahead with many in flight, so
// a task that waits for its inputs does not hold back one queued after it that is ready. The step
// ends with its last task; the bottleneck is the resource busy longest.

#include <algorithm>
#include <optional>
#include <string>

#include "engine/layout.h"
#include "engine/sizing.h"
#include "engine/update.h"
#include "ferry/check.h"
#include "ferry/io.h"
#include "plan/plan_impl.h"

namespace ferry::detail {
namespace {

// Note: elementwise work (norms, activations, residual adds, casts) is memory-bound. Each tensor
// autograd saves is written once and read about once more in forward; backward moves twice that.
constexpr double kForwardTrafficPerSavedByte = 2.0;

class Timeline {
 public:
  // With shared NVMe, reads and writes take turns on the drives as one resource.
  Timeline(StepPrediction* out, bool nvme_shared) : out_(out), nvme_shared_(nvme_shared) {}

  // Tasks from now on belong to step `step`; only step `recorded` goes into the prediction.
  void begin_step(int step, int recorded) {
    step_ = step;
    recording_ = step == recorded;
    step_end_.push_back(0);
  }
  double step_end(int step) const { return step_end_[static_cast<std::size_t>(step)]; }

  double run(Resource resource, double ready, double seconds, std::string name,
             std::uint64_t bytes = 0) {
    const int r = static_cast<int>(resource);
    const int queue = nvme_shared_ && resource == Resource::kNvmeWrite ? static_cast<int>(Resource::kNvmeRead) : r;
    std::vector<Interval>& busy = busy_[queue];
    // The intervals are disjoint and sorted, so their ends are sorted too.
    auto at = std::upper_bound(busy.begin(), busy.end(), ready,
                               [](double t, const Interval& interval) { return t < interval.end; });
    double start = ready;
    for (; at != busy.end() && at->start < start + seconds; ++at) start = std::max(start, at->end);
    busy.insert(at, {start, start + seconds});
    step_end_.back() = std::max(step_end_.back(), start + seconds);
    if (recording_) {
      out_->busy_seconds[r] += seconds;
      out_->moved_bytes[r] += bytes;
      out_->spans.push_back({std::move(name), resource, start, start + seconds});
    }
    return start + seconds;
  }

 private:
  struct Interval {
    double start;
    double end;
  };
  StepPrediction* out_;
  const bool nvme_shared_;
  std::vector<Interval> busy_[kResourceCount];
  std::vector<double> step_end_;
  int step_ = 0;
  bool recording_ = false;
};

class StepBuilder {
 public:
  StepBuilder(const PlanRequest& request, const Sizing& sizing)
      : request_(request), sizing_(sizing), config_(sizing.config), hw_(request.hardware),
        timeline_(&out_, request.hardware.nvme_shared), parts_(part_shapes(request.model)),
        e_(compute_element_size(config_.precision)), tflops_(hw_.matmul_tflops(config_.precision)),
        ranks_{0, request.world_size} {
    // What a visit of a part brings to the device, as the engine's store moves it: its trained
    // parameters and its frozen ones, in their storage (an fp8 base at about a byte an element).
    for (const Part& part : parts_of(parts_)) {
      visit_bytes_.push_back(visit_bytes(part, config_));
      frozen_bytes_.push_back(frozen_visit_bytes(part, config_));
    }
    states_ = static_cast<std::uint64_t>(optimizer_state_count(config_.optimizer));
    master_ = config_.precision != Precision::kF32 ? 1 : 0;
    // Clipping and loss scaling hold every update until backward has measured all gradients.
    deferred_ = config_.max_grad_norm > 0 ||
                (config_.mode != Mode::kZo2 &&
                 config_.loss_scale.enabled.value_or(config_.precision == Precision::kF16));
    if (request.measured) {
      use_measured(*request.measured);
    } else {
      estimate_compute();
    }
  }

  // Note: steps overlap. The last uploads and NVMe write-backs of the CPU updates and zo2's last
  // offloads run while the next step starts, as far as each part's next use allows. So three
  // steps are replayed back to back, each part's next use waiting for its update, and the period
  // is measured between the ends of the first and the third; the middle one is reported.
  StepPrediction build() {
    params_ready_.assign(parts_.size(), 0);
    states_ready_.assign(parts_.size(), 0);
    for (int step = 0; step < 3; ++step) {
      timeline_.begin_step(step, 1);
      executed_flops_ = 0;
      if (config_.mode == Mode::kZo2) {
        zeroth_order(step);
      } else {
        first_order();
      }
    }
    out_.executed_flops = executed_flops_;
    out_.step_seconds = (timeline_.step_end(2) - timeline_.step_end(0)) / 2;
    const double origin = out_.spans.empty() ? 0 : std::min_element(out_.spans.begin(), out_.spans.end(),
        [](const PlanSpan& a, const PlanSpan& b) { return a.start_s < b.start_s; })->start_s;
    for (PlanSpan& span : out_.spans) {
      span.start_s -= origin;
      span.end_s -= origin;
    }
    return out_;
  }

 private:
  std::size_t blocks() const { return parts_.size() - 2; }
  std::uint64_t numel(std::size_t part) const { return static_cast<std::uint64_t>(parts_[part].numel); }
  // This rank's ZeRO-2 shard of a part: what its master and optimizer states hold and its update reads.
  std::uint64_t shard(std::size_t part) const {
    return static_cast<std::uint64_t>(shard_of(ranks_, parts_[part].numel).numel);
  }
  const BlockActivations& activations(std::size_t block) const { return config_.placement.activations[block]; }
  std::uint64_t activation_bytes(std::size_t block) const {
    return activations(block).recompute ? sizing_.block.checkpoint_bytes : sizing_.block.graph_bytes;
  }

  double seconds(Resource resource, std::uint64_t bytes) const {
    const double b = static_cast<double>(bytes);
    switch (resource) {
      case Resource::kPcieUp: return b / (hw_.pcie_h2d_gbps * 1e9);
      case Resource::kPcieDown: return b / (hw_.pcie_d2h_gbps * 1e9);
      case Resource::kNvmeRead: return b / (hw_.nvme_read_gbps(config_.nvme_directories) * 1e9);
      case Resource::kNvmeWrite: return b / (hw_.nvme_write_gbps(config_.nvme_directories) * 1e9);
      case Resource::kCompute: return b / (hw_.gpu_memory_gbps * 1e9);
      case Resource::kCollectives: return b / (hw_.link_gbps * 1e9);
      case Resource::kCpuOptimizer: break;
    }
    FERRY_ASSERT(false, "no byte rate for ", to_string(resource));
    return 0;
  }

  double move(Resource resource, double ready, std::uint64_t bytes, std::string name) {
    return timeline_.run(resource, ready, seconds(resource, bytes), std::move(name), bytes);
  }

  // One stream: compute runs in the order it is issued.
  double compute(double ready, double seconds, double flops, std::string name) {
    executed_flops_ += flops;
    compute_end_ = timeline_.run(Resource::kCompute, std::max(ready, compute_end_), seconds, std::move(name));
    return compute_end_;
  }

  // Compute from FLOPs at the matmul rate and elementwise bytes at memory bandwidth.
  void estimate_compute() {
    const double gpu_bw = hw_.gpu_memory_gbps * 1e9;
    const double block_forward = sizing_.block.forward_flops / (tflops_ * 1e12) +
                                 kForwardTrafficPerSavedByte * static_cast<double>(sizing_.block.graph_bytes) / gpu_bw;
    block_forward_s_.assign(blocks(), block_forward);
    block_backward_s_.assign(blocks(), 2 * block_forward);
    head_forward_s_ = sizing_.head.forward_flops / (tflops_ * 1e12) +
                      static_cast<double>(sizing_.head.forward_logits_bytes) / gpu_bw;
    head_backward_s_ = 2 * sizing_.head.forward_flops / (tflops_ * 1e12) +
                       static_cast<double>(sizing_.head.peak_bytes) / gpu_bw;
    // The stem's backward scatters into a dense embedding gradient.
    stem_backward_s_ = static_cast<double>(parts_.front().numel * e_) / gpu_bw;
  }

  // Note: measured seconds scale with the tokens of a micro-batch (attention's share grows with
  // the sequence, which this ignores). A measured block backward includes its recomputation, so
  // a block's backward alone is the measured one less its forward.
  void use_measured(const MeasuredCompute& measured) {
    const double scale = static_cast<double>(request_.batch * request_.seq) /
                         static_cast<double>(measured.batch * measured.seq);
    block_forward_s_.resize(blocks());
    block_backward_s_.resize(blocks());
    for (std::size_t i = 0; i < blocks(); ++i) {
      block_forward_s_[i] = scale * measured.part_forward_seconds[i + 1];
      block_backward_s_[i] = std::max(0.0, scale * measured.part_backward_seconds[i + 1] - block_forward_s_[i]);
    }
    stem_forward_s_ = scale * measured.part_forward_seconds.front();
    stem_backward_s_ = scale * measured.part_backward_seconds.front();
    head_forward_s_ = scale * measured.part_forward_seconds.back();
    head_backward_s_ = scale * measured.part_backward_seconds.back();
  }

  double forward_block(double ready, std::size_t block, const std::string& what) {
    return compute(ready, block_forward_s_[block], sizing_.block.forward_flops,
                   what + " block." + std::to_string(block));
  }

  double backward_block(double ready, std::size_t block) {
    const bool recompute = activations(block).recompute;
    return compute(ready, block_backward_s_[block] + (recompute ? block_forward_s_[block] : 0),
                   (recompute ? 3 : 2) * sizing_.block.forward_flops,
                   std::string(recompute ? "recompute and backward" : "backward") + " block." +
                       std::to_string(block));
  }

  double forward_stem(double ready) { return compute(ready, stem_forward_s_, 0, "forward stem"); }

  double head(double ready) {
    return compute(ready, head_forward_s_ + head_backward_s_, 3 * sizing_.head.forward_flops,
                   "forward and backward head");
  }

  double cpu_update_seconds(std::size_t part) const {
    const double measured = request_.measured ? request_.measured->cpu_update_params_per_s : 0;
    return static_cast<double>(shard(part)) / (measured > 0 ? measured : hw_.cpu_adam_params_per_s);
  }
  double cpu_update(double ready, std::size_t part) {
    return timeline_.run(Resource::kCpuOptimizer, ready, cpu_update_seconds(part), "optimizer " + parts_[part].name);
  }

  // Note: the engine's collectives (first_order.cpp, docs/distributed.md): a part's gradients
  // (`element` bytes each) are reduce-scattered when its backward ends, and its parameters
  // all-gathered after its update; each moves (N - 1) / N of the buffer at the link's bus
  // bandwidth. Gloo, without reduce-scatter, all-reduces the gradients: twice the traffic.
  double reduce_gradients(double ready, std::size_t part, std::uint64_t element) {
    if (!times_collectives()) return ready;
    const std::uint64_t factor = hw_.gpu_is_host ? 2 : 1;
    return move(Resource::kCollectives, ready, factor * collective_bytes(part, element),
                "reduce-scatter " + parts_[part].name + " gradients");
  }
  double gather_parameters(double ready, std::size_t part) {
    if (!times_collectives()) return ready;
    return move(Resource::kCollectives, ready, collective_bytes(part, e_), "all-gather " + parts_[part].name);
  }
  bool times_collectives() const { return ranks_.world_size > 1 && hw_.link_gbps > 0; }
  std::uint64_t collective_bytes(std::size_t part, std::uint64_t element) const {
    const auto ranks = static_cast<std::uint64_t>(ranks_.world_size);
    return numel(part) * element * (ranks - 1) / ranks;
  }

  // Note: the micro-batch order. Batch-major makes M passes over the model, one micro-batch
  // each, and sends each part's compute-dtype gradients down every pass. Layer-major makes one
  // pass with all M micro-batches through each part while it is on the device, and sends each
  // part's fp32 gradient sum down once (engine.cpp, train_layer_major).
  struct Order {
    std::size_t passes;
    std::size_t per_pass;  // micro-batches
    std::uint64_t gradient_size;  // bytes per parameter of what goes down
  };
  Order micro_batch_order() const {
    const auto micro_batches = static_cast<std::size_t>(config_.grad_accumulation);
    if (config_.micro_batch_order == MicroBatchOrder::kLayerMajor) return {1, micro_batches, 4};
    return {micro_batches, 1, e_};
  }

  // zo2: the stem, the head and gpu_blocks blocks (zo_block_home) stay on the device; the other blocks
  // stream up (from NVMe through host memory for those at home there), a few in flight, and go
  // back down on their write-back turns. A visit's kernels draw z once per sample for each update
  // they apply and once per forward, but once for the last sample's pair when the block's copy is
  // dropped after its passes (zo2.cpp, opposite_in_place). A block's frozen parameters (a LoRA base)
  // come up with each visit and never go down; the kernels touch the trained ones alone.
  // Compressed transfers are not modelled.
  void zeroth_order(int step) {
    const ZoConfig& zo = config_.zo;
    const std::uint64_t storage = compute_element_size(zo_storage(config_));
    const std::uint64_t home_bytes = storage + states_ * 4;  // per parameter, what crosses PCIe
    // A streamed block's stored weights and states as the store moves them: whole bundles.
    auto whole = [](std::uint64_t bytes) { return (bytes + kIoAlignment - 1) / kIoAlignment * kIoAlignment; };
    auto block_home_bytes = [&](std::size_t part) {
      return whole(numel(part) * storage) + states_ * whole(numel(part) * 4);
    };
    const auto samples = static_cast<double>(zo.samples);
    const auto interval = zo.write_back_interval;
    auto kernels = [&](std::size_t part, std::int64_t updates, bool pair_in_place) {
      const double launches = 2 * samples - (pair_in_place ? 1 : 0);  // one per forward's copy
      const double draws = static_cast<double>(updates) * samples + launches;
      const auto bytes = static_cast<double>(numel(part)) *
                         static_cast<double>(home_bytes * (updates > 0 ? 2 : 1) + e_ * (pair_in_place ? 2 : 1) +
                                             static_cast<std::uint64_t>(launches - 1) * (storage + e_));
      const double memory_s = bytes / (hw_.gpu_memory_gbps * 1e9);
      const double draw_s = hw_.zo_normals_per_s > 0 ? draws * static_cast<double>(numel(part)) / hw_.zo_normals_per_s : 0;
      return std::max(memory_s, draw_s);
    };
    const double forwards = 2.0 * samples;
    std::vector<std::size_t> streamed;
    for (std::size_t i = 0; i < blocks(); ++i) {
      if (zo_block_home(zo, static_cast<std::int64_t>(i), static_cast<std::int64_t>(blocks())) != Tier::kGpu) streamed.push_back(i);
    }
    released_.resize(streamed.size(), 0);
    const std::size_t in_flight = std::min(streamed.size(), static_cast<std::size_t>(zo.blocks_in_flight));
    double c = compute(0, kernels(0, 1, false) + forwards * stem_forward_s_, 0, "stem: update, perturb, forwards");
    std::size_t visit = 0;
    for (std::size_t i = 0; i < blocks(); ++i) {
      const std::size_t part = i + 1;
      const std::string name = "block." + std::to_string(i);
      const double flops = forwards * sizing_.block.forward_flops;
      const double forwards_s = forwards * block_forward_s_[i];
      const Tier home = zo_block_home(zo, static_cast<std::int64_t>(i), static_cast<std::int64_t>(blocks()));
      if (home == Tier::kGpu) {
        c = compute(c, kernels(part, 1, false) + forwards_s, flops, name + ": update, perturb, forwards");
        continue;
      }
      // The engine's turns (zo2.cpp, writes_back): with u updates so far, block p goes home when
      // (u + p) % interval == 0, and its home copy then lags by interval updates, else by fewer.
      const std::int64_t updates_so_far = step + interval;
      const std::int64_t lag = (updates_so_far + static_cast<std::int64_t>(part) - 1) % interval + 1;
      const bool goes_home = lag == interval;
      const std::uint64_t bytes = block_home_bytes(part);
      const std::uint64_t up_bytes = bytes + frozen_bytes_[part];
      // A window place frees when the visit `in_flight` places earlier (in this step or the last)
      // has left the device.
      double ready = std::max(params_ready_[part], released_[(visit + streamed.size() - in_flight) % streamed.size()]);
      if (home == Tier::kNvme) ready = move(Resource::kNvmeRead, ready, up_bytes, "read " + name);
      const double up = move(Resource::kPcieUp, ready, up_bytes, "upload " + name);
      const bool pair_in_place = !goes_home && zo_storage(config_) == config_.precision;
      c = compute(std::max(c, up), kernels(part, lag, pair_in_place) + forwards_s, flops,
                  name + ": " + std::to_string(lag) + " updates, perturb, forwards");
      released_[visit] = goes_home ? move(Resource::kPcieDown, c, bytes, "write back " + name) : c;
      if (goes_home) {
        params_ready_[part] = home == Tier::kNvme ? move(Resource::kNvmeWrite, released_[visit], bytes, "write " + name)
                                                  : released_[visit];
      }
      ++visit;
    }
    const std::size_t head_part = parts_.size() - 1;
    compute(c, kernels(head_part, 1, false) + forwards * head_forward_s_, forwards * sizing_.head.forward_flops,
            "head: update, perturb, forwards and losses");
  }

  // The first-order step over any placement (sizing_.placement). Streamed blocks' parameters come
  // from NVMe or host memory through a window of blocks_in_flight visits; the others stay on the
  // device. Forward sends swapped checkpoints down (and on to NVMe); backward brings each block's
  // parameters and checkpoints back with its visit. A part the CPU updates sends its gradients down
  // as its backward ends and is updated as they arrive, its optimizer state read from NVMe (where
  // it lives there) while the part before it is updated, and written back; its new parameters go
  // up (resident), stay in host memory, or go home to NVMe. Between micro-batches, and until
  // clipping or loss scaling has seen every gradient, gradients wait at home (NVMe: written and
  // read back; fp32 sums with accumulation). The parts the device updates run ferry's device
  // kernels after backward, memory-bound, on the compute stream, while the CPU works on its share.
  // Layer-major, one pass carries every micro-batch: each block is fetched once per direction and
  // the gradients wait at home only for clipping or loss scaling.
  void first_order() {
    const std::vector<PartPlacement>& homes = sizing_.placement.parts;
    const std::size_t count = blocks();
    const std::size_t head_part = parts_.size() - 1;
    const auto window = static_cast<std::size_t>(window_capacity(config_, sizing_.placement));
    const std::int64_t micro_batches = config_.grad_accumulation;
    const Order order = micro_batch_order();
    const bool gradients_home = order.passes > 1 || deferred_;
    const std::uint64_t gradient_home_size = micro_batches > 1 ? 4 : e_;
    auto cpu = [&](std::size_t part) { return !homes[part].updated_on_gpu(); };
    auto nvme = [](Tier tier) { return tier == Tier::kNvme; };
    // What waits at home between passes: the fp32 sum with accumulation, else the gradients.
    auto gradients_on_nvme = [&](std::size_t part) {
      return micro_batches > 1 ? nvme(homes[part].accumulator) : nvme(homes[part].grads);
    };
    auto nvme_state_bytes = [&](std::size_t part) {
      const PartPlacement& home = homes[part];
      std::uint64_t per = master_ && nvme(home.master) ? 4 : 0;
      for (std::uint64_t k = 0; k < states_; ++k) per += nvme(home.states[k]) ? 4 : 0;
      return per * shard(part);
    };
    std::vector<double> forward_end(count, 0), backward_end(count, 0);
    std::vector<std::vector<double>> activation_home(count, std::vector<double>(order.per_pass, 0));
    std::vector<double> gradients_at_home(parts_.size(), 0), states_read(parts_.size(), 0);
    double c = 0;
    double reduced = 0;  // the last reduction of a part's gradients
    auto fetch_block = [&](std::size_t block, double ready) {
      const std::size_t part = block + 1;
      if (!homes[part].streamed()) return params_ready_[part];
      ready = std::max(ready, params_ready_[part]);
      if (nvme(homes[part].params)) {
        ready = move(Resource::kNvmeRead, ready, visit_bytes_[part], "read " + parts_[part].name + " parameters");
      }
      return move(Resource::kPcieUp, ready, visit_bytes_[part], parts_[part].name + " parameters up");
    };
    // In fp32 a part's parameters are its master: a part on NVMe reads them back to update them.
    auto read_states = [&](std::size_t part, double ready) {
      const std::uint64_t bytes = nvme_state_bytes(part) +
                                  (gradients_home && gradients_on_nvme(part) ? numel(part) * gradient_home_size : 0) +
                                  (master_ == 0 && nvme(homes[part].params) ? numel(part) * e_ : 0);
      states_read[part] = bytes == 0 ? ready
                                     : move(Resource::kNvmeRead, std::max({ready, states_ready_[part], gradients_at_home[part]}),
                                            bytes, "read " + parts_[part].name + " states");
    };
    auto next_cpu_part = [&](std::size_t part) -> std::optional<std::size_t> {
      for (std::size_t next = part; next-- > 0;) {
        if (cpu(next)) return next;
      }
      return std::nullopt;
    };
    auto optimize = [&](std::size_t part, double ready) {
      const double optimized = cpu_update(std::max(ready, states_read[part]), part);
      const double started = optimized - cpu_update_seconds(part);
      const double updated = gather_parameters(optimized, part);
      if (auto next = next_cpu_part(part)) read_states(*next, started);
      const std::uint64_t written = nvme_state_bytes(part) + (nvme(homes[part].params) ? numel(part) * e_ : 0);
      states_ready_[part] = written == 0 ? updated
                                         : move(Resource::kNvmeWrite, updated, written, "write " + parts_[part].name + " states");
      params_ready_[part] = homes[part].params == Tier::kGpu
                                ? move(Resource::kPcieUp, updated, numel(part) * e_, "parameters up " + parts_[part].name)
                            : nvme(homes[part].params) ? states_ready_[part]
                                                       : updated;
    };
    auto first_cpu_part = [&]() -> std::optional<std::size_t> { return next_cpu_part(parts_.size()); };
    for (std::size_t pass = 0; pass < order.passes; ++pass) {
      const bool update_now = pass + 1 == order.passes && !deferred_;
      auto finished = [&](std::size_t part, double at) {
        at = reduce_gradients(at, part, order.gradient_size);
        reduced = std::max(reduced, at);
        if (!cpu(part)) return;
        double down = move(Resource::kPcieDown, at, numel(part) * order.gradient_size,
                           parts_[part].name + " gradients down");
        if (update_now) {
          optimize(part, down);
          return;
        }
        if (!gradients_on_nvme(part)) {
          gradients_at_home[part] = std::max(gradients_at_home[part], down);
          return;
        }
        if (pass > 0) {
          down = move(Resource::kNvmeRead, std::max(down, gradients_at_home[part]), numel(part) * gradient_home_size,
                      "read " + parts_[part].name + " gradients");
        }
        gradients_at_home[part] = move(Resource::kNvmeWrite, down, numel(part) * gradient_home_size,
                                       "write " + parts_[part].name + " gradients");
      };
      for (std::size_t m = 0; m < order.per_pass; ++m) c = forward_stem(std::max(c, params_ready_[0]));
      for (std::size_t i = 0; i < count; ++i) {
        const double slot = i >= window ? forward_end[i - window] : 0;
        const double fetched = fetch_block(i, slot);
        for (std::size_t m = 0; m < order.per_pass; ++m) {
          c = forward_block(std::max(c, fetched), i, "forward");
          double& home = activation_home[i][m];
          home = c;
          if (activations(i).tier != Tier::kGpu) {
            const std::string name = "checkpoint block." + std::to_string(i);
            home = move(Resource::kPcieDown, c, activation_bytes(i), name + " down");
            if (activations(i).tier == Tier::kNvme) home = move(Resource::kNvmeWrite, home, activation_bytes(i), "write " + name);
          }
        }
        forward_end[i] = c;
      }
      const double head_start = c;
      for (std::size_t m = 0; m < order.per_pass; ++m) c = head(std::max(c, params_ready_[head_part]));
      if (update_now) {
        if (auto first = first_cpu_part()) read_states(*first, head_start);
      }
      finished(head_part, c);
      for (std::size_t k = 0; k < count; ++k) {
        const std::size_t i = count - 1 - k;
        const double slot = k >= window ? backward_end[i + window] : head_start;
        const double fetched = fetch_block(i, slot);
        for (std::size_t m = 0; m < order.per_pass; ++m) {
          double ready = fetched;
          if (activations(i).tier != Tier::kGpu) {
            const std::string name = "checkpoint block." + std::to_string(i);
            double at = std::max(slot, activation_home[i][m]);
            if (activations(i).tier == Tier::kNvme) at = move(Resource::kNvmeRead, at, activation_bytes(i), "read " + name);
            ready = std::max(ready, move(Resource::kPcieUp, at, activation_bytes(i), name + " up"));
          }
          c = backward_block(std::max(c, ready), i);
        }
        backward_end[i] = c;
        finished(i + 1, c);
      }
      for (std::size_t m = 0; m < order.per_pass; ++m) c = compute(c, stem_backward_s_, 0, "backward stem");
      finished(0, c);
    }
    if (deferred_) {
      double all_home = c;
      for (double at : gradients_at_home) all_home = std::max(all_home, at);
      if (auto first = first_cpu_part()) read_states(*first, all_home);
      for (std::size_t part = parts_.size(); part-- > 0;) {
        if (cpu(part)) optimize(part, all_home);
      }
    }
    // ferry's device kernels: memory-bound, reading and writing the parameters, the master and the
    // states and reading the gradients.
    std::uint64_t device_bytes = 0;
    for (std::size_t part = 0; part < parts_.size(); ++part) {
      if (!cpu(part)) device_bytes += shard(part) * (3 * e_ + 2 * 4 * (master_ + states_));
    }
    if (device_bytes == 0) return;
    const double updated = compute(std::max(c, reduced), seconds(Resource::kCompute, device_bytes), 0, "optimizer (device)");
    for (std::size_t part = 0; part < parts_.size(); ++part) {
      if (!cpu(part)) params_ready_[part] = std::max(params_ready_[part], gather_parameters(updated, part));
    }
  }

  const PlanRequest& request_;
  const Sizing& sizing_;
  const EngineConfig& config_;
  const Hardware& hw_;
  StepPrediction out_;
  Timeline timeline_;
  const std::vector<PartShape> parts_;
  std::vector<std::uint64_t> visit_bytes_;  // per part
  std::vector<std::uint64_t> frozen_bytes_;  // per part: its frozen bundle's share of visit_bytes_
  const std::uint64_t e_;
  const double tflops_;
  const Ranks ranks_;
  std::uint64_t states_ = 0;
  std::uint64_t master_ = 0;
  bool deferred_ = false;
  std::vector<double> block_forward_s_;
  std::vector<double> block_backward_s_;  // without recomputation
  double stem_forward_s_ = 0;
  double head_forward_s_ = 0;
  double head_backward_s_ = 0;
  double stem_backward_s_ = 0;
  double executed_flops_ = 0;
  double compute_end_ = 0;
  std::vector<double> released_;  // zo2: when each streamed block's visit left the device
  // When each part's updated parameters (and, for fuyou, its written states) can be used by the
  // next step.
  std::vector<double> params_ready_;
  std::vector<double> states_ready_;
};

}  // namespace

StepPrediction predict_step(const PlanRequest& request, const Sizing& sizing) {
  return StepBuilder(request, sizing).build();
}

}  // namespace ferry::detail
