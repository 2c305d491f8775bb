#include "engine/zo2.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>

#include "engine/data_parallel.h"
#include "engine/sizing.h"
#include "engine/update.h"
#include "ferry/check.h"
#include "ferry/system.h"

#if FERRY_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace ferry {
namespace {

using detail::Part;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

optim::DType optim_dtype(torch::ScalarType type) {
  switch (type) {
    case torch::kBFloat16: return optim::DType::kBF16;
    case torch::kHalf: return optim::DType::kF16;
    default: return optim::DType::kF32;
  }
}

std::uint64_t mix(std::uint64_t x) {  // splitmix64's finalizer
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

optim::ZoRule zo_rule(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::kAdam: return optim::ZoRule::kAdam;
    case OptimizerKind::kAdamW: return optim::ZoRule::kAdamW;
    default: return optim::ZoRule::kSgd;
  }
}

}  // namespace

std::uint64_t zo_step_seed(std::uint64_t seed, std::int64_t step, std::int64_t sample) {
  return mix(seed ^ mix(static_cast<std::uint64_t>(step) * optim::kMaxZoSamples +
                        static_cast<std::uint64_t>(sample)));
}

// Runs jobs in order on a thread of its own; the caller waits for the first n of them. A job's
// exception stops the rest and is rethrown to the waiter.
class detail::Zo2Trainer::Encoder {
 public:
  explicit Encoder(std::vector<std::function<void()>> jobs)
      : jobs_(std::move(jobs)), thread_([this] { run(); }) {}
  ~Encoder() { thread_.join(); }

  // Returns the seconds the caller waited.
  double wait(std::size_t count) {
    const auto start = Clock::now();
    std::unique_lock<std::mutex> lock(mutex_);
    done_changed_.wait(lock, [&] { return done_ >= count || error_; });
    if (error_) std::rethrow_exception(error_);
    return seconds_since(start);
  }

  // The seconds the jobs have run so far.
  double busy_seconds() {
    std::lock_guard<std::mutex> lock(mutex_);
    return busy_seconds_;
  }

 private:
  void run() {
    for (const std::function<void()>& job : jobs_) {
      const auto start = Clock::now();
      try {
        job();
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        error_ = std::current_exception();
        done_changed_.notify_all();
        return;
      }
      std::lock_guard<std::mutex> lock(mutex_);
      ++done_;
      busy_seconds_ += seconds_since(start);
      done_changed_.notify_all();
    }
  }

  std::vector<std::function<void()>> jobs_;
  std::mutex mutex_;
  std::condition_variable done_changed_;
  std::size_t done_ = 0;           // guarded by mutex_
  double busy_seconds_ = 0;        // guarded by mutex_
  std::exception_ptr error_;       // guarded by mutex_
  std::thread thread_;             // last: starts once the rest is built
};

detail::Zo2Trainer::Zo2Trainer(LayeredModel model_in, EngineConfig config_in)
    : model_(std::move(model_in)),
      config_(std::move(config_in)),
      compute_dtype(detail::scalar_type(config_.precision)),
      storage_dtype(detail::scalar_type(detail::zo_storage(config_))),
      tracer_(std::make_shared<detail::Tracer>(config_.trace)) {
  detail::validate(config_);
  if (config_.device.is_cuda() && !config_.device.has_index()) config_.device = torch::Device(torch::kCUDA, 0);
  if (config_.optimizer_threads > 0) optim::set_num_threads(config_.optimizer_threads);
  parts_ = detail::describe_parts(model_);
  detail::check_base_storage(parts_, config_);
  for (const Part& part : parts_) {
    FERRY_CHECK(config_.zo.transfer == ZoTransfer::kStorage || part.frozen_numel == 0, "zo transfer ",
                to_string(config_.zo.transfer), " compresses a streamed block's trained weights, but ", part.name,
                " has frozen parameters (a LoRA base) beside them: use zo transfer storage, and base storage fp8 "
                "to send the base in fp8");
  }
  std::vector<PartShape> shapes;
  for (const Part& part : parts_) shapes.push_back({part.name, part.numel, part.frozen_numel, part.frozen_channels});
  config_.zo.gpu_blocks = zo_gpu_blocks(shapes, config_);
  detail::check_budgets(engine_demand(shapes, config_), config_);
  StoreOptions store_options = detail::store_options(config_);
  detail::trace_transfers(store_options, tracer_);
  store = std::make_unique<Store>(store_options);
  allocate_and_bind();
  home_updates.assign(parts_.size(), 0);
  window = std::make_unique<detail::DeviceWindow>(*store, static_cast<std::size_t>(config_.zo.blocks_in_flight));
  // Both forwards of a step must see the same function: the modules' own training switches stay
  // off, and ferry's dropout draws the same masks in both (train_step gives them one context).
  model_.train(false);
}

detail::Zo2Trainer::~Zo2Trainer() {
  try {
    finish_encoding();
  } catch (...) {
  }
}

void detail::Zo2Trainer::allocate_and_bind() {
  torch::NoGradGuard no_grad;
  detail::move_buffers(model_, config_.device);
  bundles = detail::lay_out_zo(*store, parts_, config_, nullptr).parts;
  segment_counts.assign(parts_.size(), 0);
  for (std::size_t p = 0; p < parts_.size(); ++p) {
    const Part& part = parts_[p];
    const ZoBundles& b = bundles[p];
    if (part.frozen != kNoBundle) {
      // Read-only at home; a resident one is bound once, an fp8 or streamed one at each visit.
      detail::write_frozen(*store, part, config_, detail::pack_slices(part.frozen_slices, part.frozen_numel));
      if (b.home == Tier::kGpu && !detail::fp8_frozen(part, config_)) {
        detail::bind_frozen_device_copy(*store, part, config_, /*in_flight=*/false);
      } else {
        detail::unbind_frozen(part, config_);
      }
    }
    if (!part.trainable()) continue;
    if (b.compressed && config_.zo.transfer == ZoTransfer::kFp8) write_segment_ends(p);
    torch::Tensor initial = torch::empty({part.numel}, torch::TensorOptions().dtype(storage_dtype));
    for (const detail::ParameterSlice& slice : part.slices) {
      initial.narrow(0, slice.offset, slice.numel).copy_(slice.parameter.detach().reshape({-1}));
    }
    write_home(p, initial, {});
    // The module now computes from the device copy; its own parameters are freed.
    detail::bind_parameters(part, detail::typed_view(*store, b.compute, Tier::kGpu, compute_dtype, part.numel));
  }
}

// The fp8 copy's segments are the part's parameter tensors, in their order in the bundle.
void detail::Zo2Trainer::write_segment_ends(std::size_t p) {
  const Part& part = parts_[p];
  std::vector<std::int64_t> ends;
  for (const detail::ParameterSlice& slice : part.slices) ends.push_back(slice.offset + slice.numel);
  std::sort(ends.begin(), ends.end());
  ends.back() = part.numel;
  FERRY_CHECK(static_cast<std::int64_t>(ends.size()) <= detail::kZoMaxTransferSegments, "zo transfer fp8 ",
              "keeps one scale per parameter tensor, at most ", detail::kZoMaxTransferSegments,
              " per block; ", part.name, " has ", ends.size(), ": use transfer bf16");
  auto* table = static_cast<std::int64_t*>(store->tensor(bundles[p].transfer, Tier::kHost).data_ptr());
  std::copy(ends.begin(), ends.end(), table);
  segment_counts[p] = static_cast<int>(ends.size());
}

optim::ZoTensors detail::Zo2Trainer::stored_tensors(std::size_t p) const {
  const ZoBundles& b = bundles[p];
  auto host_memory = [&](BundleId id) { return store->tensor(id, Tier::kHost).data_ptr(); };
  optim::ZoTensors tensors;
  tensors.weights = host_memory(b.weights);
  tensors.weights_dtype = optim_dtype(storage_dtype);
  if (!b.states.empty()) tensors.state0 = static_cast<float*>(host_memory(b.states[0]));
  if (b.states.size() > 1) tensors.state1 = static_cast<float*>(host_memory(b.states[1]));
  tensors.numel = parts_[p].numel;
  return tensors;
}

// Note: the fp8 copy is laid out as [segment ends (int64) | scales (fp32)] in the first
// kZoTransferTableBytes, then one code per element, so one upload carries all of it.
optim::ZoTransferCopy detail::Zo2Trainer::transfer_copy(std::size_t p, Tier tier) const {
  const BundleId id = bundles[p].transfer;
  auto* base = static_cast<std::uint8_t*>(tier == Tier::kGpu ? store->device_tensor_in_flight(id).data_ptr()
                                                             : store->tensor(id, tier).data_ptr());
  optim::ZoTransferCopy copy;
  copy.numel = parts_[p].numel;
  if (config_.zo.transfer == ZoTransfer::kBF16) {
    copy.format = optim::ZoTransferFormat::kBF16;
    copy.codes = base;
    return copy;
  }
  copy.format = optim::ZoTransferFormat::kFp8E4M3;
  copy.segments = segment_counts[p];
  copy.segment_ends = reinterpret_cast<const std::int64_t*>(base);
  copy.scales = reinterpret_cast<float*>(base + sizeof(std::int64_t) * static_cast<std::size_t>(copy.segments));
  copy.codes = base + detail::kZoTransferTableBytes;
  return copy;
}

void detail::Zo2Trainer::write_home(std::size_t p, const torch::Tensor& weights,
                             const std::vector<torch::Tensor>& states) {
  finish_encoding();
  const ZoBundles& b = bundles[p];
  const std::int64_t numel = parts_[p].numel;
  auto put = [&](BundleId id, torch::ScalarType dtype, const torch::Tensor& values) {
    const Tier staging = b.home == Tier::kNvme ? Tier::kHost : b.home;
    if (b.home == Tier::kNvme) store->allocate(id, Tier::kHost);
    detail::typed_view(*store, id, staging, dtype, numel).copy_(values.reshape({-1}));
    store->mark_dirty(id, staging);
    if (b.home == Tier::kNvme) {
      store->write_back(id, Tier::kHost, Tier::kNvme).wait();
      store->evict(id, Tier::kHost);
    }
  };
  torch::NoGradGuard no_grad;
  put(b.weights, storage_dtype, weights);
  for (std::size_t i = 0; i < states.size(); ++i) put(b.states[i], torch::kFloat, states[i]);
  if (b.compressed) {
    optim::zo_update_and_encode(stored_tensors(p), nullptr, 0, transfer_copy(p, Tier::kHost));
    store->mark_dirty(b.transfer, Tier::kHost);
  }
}

// --- compressed transfers ---------------------------------------------------------------------

// Note: a compressed block's device copy is lossy, so the device never updates the block: after
// each step, the encoder (a thread of its own, each job parallel over the optim arena) applies
// the step's update to the stored weights and states in host memory and writes the next transfer
// copy, block by block in sweep order. The next sweep waits for a block's job before the window
// may fetch it, so the CPU work runs ahead of the GPU by as many blocks as it can; when it cannot
// keep up, the step is CPU-bound (see docs/zo2.md). The jobs touch only their own blocks' host
// memory, which nothing else reads or writes until the job is awaited. The encoder's time counts
// as optimizer_seconds (when it finishes), the sweep's waits for it as optimizer_wait_seconds.
void detail::Zo2Trainer::start_encoding() {
  finish_encoding();
  std::vector<std::function<void()>> jobs;
  for (std::size_t p = 0; p < parts_.size(); ++p) {
    if (!bundles[p].compressed || home_updates[p] == update_count) continue;
    std::vector<optim::ZoUpdate> part_updates;
    for (const PendingUpdate& pending : updates) {
      if (pending.number > home_updates[p]) part_updates.push_back(update_for(p, pending));
    }
    jobs.push_back([stored = stored_tensors(p), transfer = transfer_copy(p, Tier::kHost),
                    part_updates = std::move(part_updates), tracer = tracer_, name = "encode " + parts_[p].name] {
      const auto start = Clock::now();
      optim::zo_update_and_encode(stored, part_updates.data(), static_cast<int>(part_updates.size()), transfer);
      tracer->record(name, detail::Track::kOptimizer, start, Clock::now());
    });
    encoding.push_back(p);
  }
  if (jobs.empty()) return;
  encoding_updates = update_count;
  encoder = std::make_unique<Encoder>(std::move(jobs));
}

void detail::Zo2Trainer::await_encoded(std::size_t p) {
  const auto job = std::find(encoding.begin(), encoding.end(), p);
  if (job == encoding.end()) return;
  stats_.optimizer_wait_seconds += encoder->wait(static_cast<std::size_t>(job - encoding.begin()) + 1);
  mark_encoded(p);
}

void detail::Zo2Trainer::finish_encoding() {
  if (!encoder) return;
  stats_.optimizer_wait_seconds += encoder->wait(encoding.size());
  stats_.optimizer_seconds += encoder->busy_seconds();
  for (std::size_t p : encoding) mark_encoded(p);
  encoder.reset();
  encoding.clear();
}

void detail::Zo2Trainer::mark_encoded(std::size_t p) {
  if (home_updates[p] == encoding_updates) return;
  const ZoBundles& b = bundles[p];
  store->mark_dirty(b.weights, Tier::kHost);
  for (BundleId id : b.states) store->mark_dirty(id, Tier::kHost);
  store->mark_dirty(b.transfer, Tier::kHost);
  home_updates[p] = encoding_updates;
}

torch::Tensor detail::Zo2Trainer::read_home(std::size_t p, BundleId id, torch::ScalarType dtype) {
  FERRY_CHECK(flushed(), "reading part ", parts_[p].name, "'s stored copy needs flush() first");
  const Tier home = bundles[p].home;
  if (home == Tier::kNvme) store->fetch(id, Tier::kHost).wait();
  const Tier from = home == Tier::kNvme ? Tier::kHost : home;
  torch::Tensor values =
      detail::typed_view(*store, id, from, dtype, parts_[p].numel).to(torch::kCPU, torch::kFloat, false, true);
  if (home == Tier::kNvme) store->evict(id, Tier::kHost);
  return values;
}

torch::Tensor detail::Zo2Trainer::read_weights(std::size_t p) { return read_home(p, bundles[p].weights, storage_dtype); }

std::vector<torch::Tensor> detail::Zo2Trainer::read_states(std::size_t p) {
  std::vector<torch::Tensor> states;
  for (BundleId id : bundles[p].states) states.push_back(read_home(p, id, torch::kFloat));
  return states;
}

// --- the sweep --------------------------------------------------------------------------------

optim::ZoUpdate detail::Zo2Trainer::update_for(std::size_t p, const PendingUpdate& pending) const {
  const OptimizerConfig& optimizer = config_.optimizer;
  optim::ZoUpdate update;
  update.rule = zo_rule(optimizer.kind);
  update.lr = static_cast<float>(pending.lr);
  update.weight_decay = static_cast<float>(optimizer.weight_decay);
  update.momentum = static_cast<float>(optimizer.momentum);
  update.beta1 = static_cast<float>(optimizer.beta1);
  update.beta2 = static_cast<float>(optimizer.beta2);
  update.eps = static_cast<float>(optimizer.eps);
  // Adam's bias corrections count the updates the states have seen.
  const auto count = static_cast<double>(pending.number);
  update.bias_correction1 = static_cast<float>(1.0 - std::pow(optimizer.beta1, count));
  update.bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(optimizer.beta2, count)));
  update.samples = static_cast<int>(pending.seeds.size());
  for (int s = 0; s < update.samples; ++s) {
    update.seeds[s] = pending.seeds[s];
    update.projected_grads[s] = static_cast<float>(pending.projected_grads[s]);
  }
  update.stream = p;
  update.decay_count = parts_[p].decay_numel;
  return update;
}

bool detail::Zo2Trainer::flushed() const { return updates.empty(); }

// Note: a streamed block's updated copy need not go home every step. Its stored copy at home may
// lag up to write_back_interval updates behind: each visit replays the missing updates on the
// device (the kernel applies them in order, rounding after each, so the weights are exactly those
// of applying them one step at a time) and only every write_back_interval-th visit sends the
// result home. Blocks take turns, block p going home when (updates + p) % interval == 0, so each
// step downloads 1/interval of the model instead of all of it. A flush sends everything home.
bool detail::Zo2Trainer::writes_back(std::size_t p, bool flushing) const {
  if (flushing) return true;
  const auto interval = static_cast<std::int64_t>(config_.zo.write_back_interval);
  return (update_count + static_cast<std::int64_t>(p)) % interval == 0;
}

void detail::Zo2Trainer::apply(std::size_t p, const std::vector<optim::ZoUpdate>& part_updates, const Pass* pass,
                        bool opposite_in_place) {
  const ZoBundles& b = bundles[p];
  auto device_memory = [&](BundleId id) { return store->device_tensor_in_flight(id).data_ptr(); };
  if (b.compressed) {
    FERRY_ASSERT(pass && part_updates.empty(), "a compressed block is updated on the host, not on the device");
    const optim::ZoTransferCopy transfer = transfer_copy(p, Tier::kGpu);
    const optim::ZoPerturb perturb{{pass->seed, p}, pass->scale};
#if FERRY_WITH_CUDA
    if (config_.device.is_cuda()) {
      optim::zo_perturb_transfer_cuda(transfer, device_memory(b.compute), optim_dtype(compute_dtype), perturb,
                                      c10::cuda::getCurrentCUDAStream(config_.device.index()).stream());
      return;
    }
#endif
    optim::zo_perturb_transfer(transfer, device_memory(b.compute), optim_dtype(compute_dtype), perturb);
    return;
  }
  optim::ZoTensors tensors;
  tensors.weights = device_memory(b.weights);
  tensors.weights_dtype = optim_dtype(storage_dtype);
  if (!b.states.empty()) tensors.state0 = static_cast<float*>(device_memory(b.states[0]));
  if (b.states.size() > 1) tensors.state1 = static_cast<float*>(device_memory(b.states[1]));
  tensors.compute = pass ? device_memory(b.compute) : nullptr;
  tensors.compute_dtype = optim_dtype(compute_dtype);
  if (opposite_in_place) tensors.opposite = tensors.weights;
  tensors.numel = parts_[p].numel;
  optim::ZoPerturb perturb;
  if (pass) perturb = {{pass->seed, p}, pass->scale};
#if FERRY_WITH_CUDA
  if (config_.device.is_cuda()) {
    optim::zo_apply_cuda(tensors, part_updates.data(), static_cast<int>(part_updates.size()), perturb,
                         c10::cuda::getCurrentCUDAStream(config_.device.index()).stream());
    return;
  }
#endif
  optim::zo_apply(tensors, part_updates.data(), static_cast<int>(part_updates.size()), perturb);
}

// Note: a streamed block's device copy that does not go home is dropped after its passes. So the
// kernel that writes the last sample's + copy can write its - copy over the weights' device copy
// from the same z: one kernel and one draw of z for the pair instead of two, work that a block
// resident on the device cannot save. Returns the pass that then reads the weights' device copy
// (SIZE_MAX: none).
std::size_t detail::Zo2Trainer::opposite_in_place(std::size_t p, bool dropped, const std::vector<Pass>& passes) const {
  if (!dropped || bundles[p].compressed || !parts_[p].trainable() || storage_dtype != compute_dtype ||
      passes.size() < 2) {
    return SIZE_MAX;
  }
  const Pass& first = passes[passes.size() - 2];
  const Pass& second = passes.back();
  if (second.seed != first.seed || second.scale != -first.scale) return SIZE_MAX;
  return passes.size() - 1;
}

void detail::Zo2Trainer::sweep(std::vector<Pass>& passes, const StepContext& context, const torch::Tensor& tokens,
                        const torch::Tensor& labels) {
  torch::NoGradGuard no_grad;
  const bool flushing = passes.empty();
  if (flushing) finish_encoding();  // the compressed blocks are flushed on the host
  // A flush has nothing to do for the compressed blocks, nor for parts without trained parameters.
  auto passed_over = [&](std::size_t p) { return flushing && (bundles[p].compressed || !parts_[p].trainable()); };
  std::vector<std::vector<BundleId>> visits;
  std::vector<std::size_t> visit_of(parts_.size(), SIZE_MAX), visiting;
  for (std::size_t p = 0; p < parts_.size(); ++p) {
    const Part& part = parts_[p];
    const ZoBundles& b = bundles[p];
    if (part.kind != models::Part::kBlock || b.home == Tier::kGpu || passed_over(p)) continue;
    visit_of[p] = visits.size();
    visiting.push_back(p);
    if (b.compressed) {
      visits.push_back({b.transfer});
      continue;
    }
    std::vector<BundleId> visit;
    if (part.trainable()) {
      visit.push_back(b.weights);
      visit.insert(visit.end(), b.states.begin(), b.states.end());
    }
    if (!flushing && part.frozen != kNoBundle) visit.push_back(part.frozen);
    visits.push_back(std::move(visit));
  }
  window->begin(std::move(visits));
  for (std::size_t p = 0; p < parts_.size(); ++p) {
    const Part& part = parts_[p];
    const ZoBundles& b = bundles[p];
    const bool streamed = visit_of[p] != SIZE_MAX;
    if (!part.trainable()) home_updates[p] = update_count;  // nothing of it ever changes
    if (passed_over(p)) continue;
    if (part.kind == models::Part::kBlock && part.trainable()) {
      detail::bind_parameters(part, detail::typed_view(*store, b.compute, Tier::kGpu, compute_dtype, part.numel));
    }
    if (streamed) {
      // The window may fetch up to blocks_in_flight visits from here: their copies must be encoded.
      const auto window_size = static_cast<std::size_t>(config_.zo.blocks_in_flight);
      const std::size_t last = std::min(visiting.size(), visit_of[p] + window_size);
      for (std::size_t k = visit_of[p]; k < last; ++k) await_encoded(visiting[k]);
      window->arrive(visit_of[p]);
    }
    // The frozen parameters are never perturbed: every pass reads the same copy, a streamed
    // visit's (read behind its upload) or a decoded fp8 base, which the modules hold for this
    // part's passes alone.
    const bool binds_frozen = !flushing && part.frozen != kNoBundle && (streamed || detail::fp8_frozen(part, config_));
    if (binds_frozen) detail::bind_frozen_device_copy(*store, part, config_, /*in_flight=*/streamed);
    std::vector<optim::ZoUpdate> part_updates;
    for (const PendingUpdate& pending : updates) {
      if (pending.number > home_updates[p]) part_updates.push_back(update_for(p, pending));
    }
    const std::vector<optim::ZoUpdate> none;
    const bool updated = !part_updates.empty();
    const std::size_t in_place = opposite_in_place(p, streamed && !(updated && writes_back(p, flushing)), passes);
    const auto compute_start = Clock::now();
    if (flushing) apply(p, part_updates, nullptr);
    for (std::size_t j = 0; j < passes.size(); ++j) {
      Pass& pass = passes[j];
      if (j == in_place) {
        detail::bind_parameters(part, detail::typed_device_view(*store, b.weights, compute_dtype, part.numel));
      } else if (part.trainable()) {
        apply(p, j == 0 ? part_updates : none, &pass, j + 1 == in_place);
      }
      switch (part.kind) {
        case models::Part::kStem: pass.hidden = model_.stem()->forward(tokens, context); break;
        case models::Part::kBlock: pass.hidden = model_.blocks()[part.index]->forward(pass.hidden, context); break;
        case models::Part::kHead:
          // Note: the stem's compute copy holds the last pass's perturbation by now; a head that
          // reads the stem's weights (tied embeddings) must see this pass's, so it is rewritten.
          if (passes.size() > 1 && parts_[0].trainable()) apply(0, none, &pass);
          pass.hidden = model_.head()->forward(pass.hidden, context);
          // Each pass's logits become its loss at once, so only one pass's logits (0.4 GiB for
          // OPT's vocabulary at batch 8 x 512 in bf16, the step's largest activation) are alive.
          if (labels.defined()) pass.hidden = model_.loss(pass.hidden, labels).detach();
          break;
      }
    }
    // The module must not keep the dropped copy alive: its storage goes back to the budget.
    if (in_place != SIZE_MAX) {
      detail::bind_parameters(part, detail::typed_view(*store, b.compute, Tier::kGpu, compute_dtype, part.numel));
    }
    if (binds_frozen) detail::unbind_frozen(part, config_);
    record_compute(p, compute_start);
    if (streamed) window->settle(visit_of[p]);
    if (b.compressed) {  // its device copy is dropped unchanged
      window->depart(visit_of[p], {});
      continue;
    }
    if (updated) {
      store->mark_dirty(b.weights, Tier::kGpu);
      for (BundleId id : b.states) store->mark_dirty(id, Tier::kGpu);
    }
    if (!streamed) {
      home_updates[p] = update_count;  // updated in place
      continue;
    }
    std::vector<Fence> down;
    if (updated && writes_back(p, flushing)) {
      down.push_back(store->write_back(b.weights, Tier::kGpu, b.home));
      for (BundleId id : b.states) down.push_back(store->write_back(id, Tier::kGpu, b.home));
      home_updates[p] = update_count;
    }
    window->depart(visit_of[p], std::move(down));
  }
  window->finish();
  const std::int64_t everywhere = *std::min_element(home_updates.begin(), home_updates.end());
  while (!updates.empty() && updates.front().number <= everywhere) updates.pop_front();
}

// --- steps ------------------------------------------------------------------------------------

std::optional<StepResult> detail::Zo2Trainer::train_step(const data::Batch& batch) {
  auto start = Clock::now();
  const std::int64_t step = steps_ + 1;
  const double lr = detail::scheduled_lr(config_.schedule, config_.optimizer.lr, step);
  torch::Tensor tokens = batch.input_ids.to(config_.device, torch::kLong);
  torch::Tensor labels = batch.labels.to(config_.device, torch::kLong);
  torch::Tensor mask = detail::device_padding_mask(batch.attention_mask, config_.device);
  // Note: one context for every pass of the step, so the +eps and -eps forwards of a sample (and
  // every sample) draw the same dropout masks: the projected gradient then measures the
  // perturbation, not the masks.
  StepContext context = model_.make_context(tokens, mask, batch.position_ids);
  context.dropout.training = true;
  context.dropout.seed = config_.dropout.seed;
  context.dropout.step = step;

  const auto eps = static_cast<float>(config_.zo.eps);
  std::vector<std::uint64_t> seeds;
  std::vector<Pass> passes;
  for (std::int64_t s = 0; s < config_.zo.samples; ++s) {
    seeds.push_back(zo_step_seed(config_.zo.seed, step, s));
    passes.push_back({seeds.back(), eps, {}});
    passes.push_back({seeds.back(), -eps, {}});
  }
  sweep(passes, context, tokens, labels);

  std::vector<torch::Tensor> losses;
  for (const Pass& pass : passes) losses.push_back(pass.hidden.to(torch::kDouble));
  // Data parallelism: each rank evaluated the same directions on its own rows; the mean of the
  // ranks' losses (the whole batch's when every rank learns as many tokens) gives the projected
  // gradients, the same bits on every rank, which then applies the same update (docs/distributed.md).
  losses.push_back(torch::scalar_tensor(static_cast<double>(tokens.numel()), torch::kDouble).to(config_.device));
  torch::Tensor values = torch::stack(losses).to(torch::kCPU);
  detail::sum_across_ranks(config_, values);
  const std::int64_t token_count = static_cast<std::int64_t>(values[2 * config_.zo.samples].item<double>());
  values /= detail::world_size(config_);

  StepResult result;
  PendingUpdate update{update_count + 1, step, lr, seeds, {}};
  double loss_sum = 0;
  for (std::int64_t s = 0; s < config_.zo.samples; ++s) {
    const double plus = values[2 * s].item<double>();
    const double minus = values[2 * s + 1].item<double>();
    const double projected = (plus - minus) / (2.0 * config_.zo.eps);
    result.loss_plus.push_back(plus);
    result.loss_minus.push_back(minus);
    result.projected_grads.push_back(projected);
    update.projected_grads.push_back(projected);
    loss_sum += plus + minus;
  }
  result.loss = loss_sum / static_cast<double>(2 * config_.zo.samples);
  result.lr = lr;
  result.tokens = token_count;
  result.step = step;
  // Note: a non-finite loss would turn every weight into NaN; the step is skipped instead, as
  // the first-order modes skip a step with non-finite gradients under loss scaling.
  result.skipped = !std::isfinite(loss_sum);
  if (!result.skipped) {
    updates.push_back(std::move(update));
    ++update_count;
    start_encoding();
  }
  steps_ = step;
  stats_.steps = steps_;
  stats_.forward_seconds += seconds_since(start);
  return result;
}

void detail::Zo2Trainer::record_compute(std::size_t p, detail::Tracer::Clock::time_point start) {
  if (!tracer_->enabled()) return;
  if (config_.device.is_cuda()) synchronize_gpu();
  const auto end = Clock::now();
  tracer_->record("zo " + parts_[p].name, detail::Track::kCompute, start, end);
  stats_.part_forward_seconds.resize(parts_.size());
  stats_.part_forward_seconds[p] += std::chrono::duration<double>(end - start).count();
}

void detail::Zo2Trainer::flush() {
  if (flushed()) return;
  std::vector<Pass> none;
  sweep(none, StepContext{}, torch::Tensor(), torch::Tensor());
}

torch::Tensor detail::Zo2Trainer::logits(const torch::Tensor& tokens, const torch::Tensor& padding_mask,
                                         const torch::Tensor& position_ids) {
  flush();
  torch::Tensor input = tokens.to(config_.device, torch::kLong);
  torch::Tensor mask = detail::device_padding_mask(padding_mask, config_.device);
  StepContext context = model_.make_context(input, mask, position_ids);
  std::vector<Pass> passes(1);
  sweep(passes, context, input, torch::Tensor());
  return passes.front().hidden;
}

namespace {
[[noreturn]] void no_backward(const char* call) {
  throw Error(detail::concat(call, " is not available in zo2 mode: it has no backward pass; train with "
                             "train_step(batch), which runs both perturbed forwards and the update"));
}
}  // namespace

torch::Tensor detail::Zo2Trainer::forward(const data::Batch&) { no_backward("forward()"); }
void detail::Zo2Trainer::backward(const torch::Tensor&) { no_backward("backward()"); }
StepResult detail::Zo2Trainer::step() { no_backward("step()"); }

void detail::Zo2Trainer::quiesce(const char*) { flush(); }

nlohmann::json detail::Zo2Trainer::checkpoint_state() const {
  return {{"step", steps_}, {"mode", to_string(Mode::kZo2)}, {"zo_seed", config_.zo.seed}, {"zo_updates", update_count}};
}

void detail::Zo2Trainer::restore_state(const nlohmann::json& state) {
  steps_ = state.value("step", std::int64_t{0});
  stats_.steps = steps_;
  // Adam's bias corrections count the updates made so far.
  update_count = state.value("zo_updates", steps_);
  home_updates.assign(parts_.size(), update_count);
}

detail::PartValues detail::Zo2Trainer::read_part(std::size_t p, bool with_states) {
  if (!parts_[p].trainable()) {
    return {torch::empty({0}, torch::kFloat),
            std::vector<torch::Tensor>(with_states ? state_count() : 0, torch::empty({0}, torch::kFloat))};
  }
  return {read_weights(p), with_states ? read_states(p) : std::vector<torch::Tensor>{}};
}

void detail::Zo2Trainer::write_part(std::size_t p, const PartValues& values) {
  if (!parts_[p].trainable()) return;
  write_home(p, values.weights.to(storage_dtype), values.states);
}

torch::Tensor detail::Zo2Trainer::read_frozen(std::size_t p) { return detail::read_frozen(*store, parts_[p], config_); }

EngineStats detail::Zo2Trainer::stats() const {
  EngineStats stats = stats_;
  stats.store = store->stats();
  return stats;
}

std::unique_ptr<detail::Trainer> detail::make_zo2_trainer(LayeredModel model, EngineConfig config) {
  return std::make_unique<Zo2Trainer>(std::move(model), std::move(config));
}

}  // namespace ferry
