#include "engine/first_order.h"

#include <torch/autograd.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "engine/data_parallel.h"
#include "engine/sizing.h"
#include "engine/stage.h"
#include "ferry/check.h"

namespace ferry::detail {

SerialWorker::SerialWorker() : thread_([this] { run(); }) {}

SerialWorker::~SerialWorker() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_one();
  thread_.join();
}

std::shared_future<void> SerialWorker::submit(std::function<void()> task) {
  std::packaged_task<void()> packaged(std::move(task));
  std::shared_future<void> done = packaged.get_future().share();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    tasks_.push_back(std::move(packaged));
  }
  wake_.notify_one();
  return done;
}

void SerialWorker::run() {
  for (;;) {
    std::packaged_task<void()> task;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [this] { return stopping_ || !tasks_.empty(); });
      if (tasks_.empty()) return;
      task = std::move(tasks_.front());
      tasks_.pop_front();
    }
    task();
  }
}

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

FirstOrderTrainer::FirstOrderTrainer(LayeredModel model, EngineConfig config)
    : model_(std::move(model)),
      config_(std::move(config)),
      compute_dtype_(scalar_type(config_.precision)),
      scaler_(config_.loss_scale, config_.loss_scale.enabled.value_or(config_.precision == Precision::kF16)),
      tracer_(std::make_shared<Tracer>(config_.trace)) {
  FERRY_CHECK(config_.staged.empty() || world_size(config_) == 1, "the staged layout ", config_.staged,
              " holds one rank's whole optimizer states, but this job has ", world_size(config_),
              " ranks, each keeping a shard: train from the checkpoint it was staged from instead");
  if (!config_.staged.empty()) staged_ = open_staged_layout(config_, staged_lock_);
  validate(config_);
  if (config_.device.is_cuda() && !config_.device.has_index()) config_.device = torch::Device(torch::kCUDA, 0);
  if (config_.optimizer_threads > 0) optim::set_num_threads(config_.optimizer_threads);
  parts_ = describe_parts(model_);
  for (const Part& part : parts_) {
    FERRY_CHECK(!staged_ || part.frozen_numel == 0, "a staged layout holds every parameter trained, but ", part.name,
                " has frozen ones (a LoRA base): train it from the model's own weights, without staged");
  }
  check_base_storage(parts_, config_);
  placement_ = resolve_placement(config_, parts_.size());
  state_.resize(parts_.size());
  for (std::size_t p = 0; p < parts_.size(); ++p) state_[p].home = placement_.parts[p];
  if (staged_) {
    check_staged_layout(*staged_, parts_, config_);
    verify_staged_layout(*staged_, parts_, config_);
  }
  check_budgets(demand(), config_);
  StoreOptions store_options = detail::store_options(config_);
  trace_transfers(store_options, tracer_);
  store_ = std::make_unique<Store>(store_options);
  window_ = std::make_unique<DeviceWindow>(*store_, window_capacity(config_, placement_));
  allocate_and_bind();
  if (staged_) {
    mark_staged_live(std::move(*staged_), config_.staged, config_.nvme_env);
    staged_.reset();
  }
  model_.train(true);
}

FirstOrderTrainer::~FirstOrderTrainer() {
  for (PartState& state : state_) {
    if (state.work.valid()) state.work.wait();
  }
}

TierDemand FirstOrderTrainer::demand() const {
  std::vector<PartShape> shapes;
  for (const Part& part : parts_) shapes.push_back({part.name, part.numel, part.frozen_numel, part.frozen_channels});
  return engine_demand(shapes, config_);
}

torch::Tensor FirstOrderTrainer::view(BundleId id, Tier tier, torch::ScalarType dtype, std::int64_t numel) const {
  return typed_view(*store_, id, tier, dtype, numel);
}

void FirstOrderTrainer::allocate_and_bind() {
  torch::NoGradGuard no_grad;
  const bool separate_master = compute_dtype_ != torch::kFloat;
  move_buffers(model_, config_.device);
  lay_out_parts(*store_, parts_, placement_, config_, ranks_of(config_), [&](const BundleSpec& spec, const char*) {
    return staged_ && spec.home == Tier::kNvme ? adopt_staged(*store_, *staged_, spec) : store_->add(spec);
  }, nullptr);
  for (std::size_t p = 0; p < parts_.size(); ++p) {
    Part& part = parts_[p];
    if (staged_) {
      // What lives on NVMe is staged already; the other parameters start from their seed.
      if (needs_seed(state_[p].home)) write_bundle(p, part.params, read_seed(*store_, part, compute_dtype_));
    } else if (part.trainable()) {
      torch::Tensor initial = pack_slices(part.slices, part.numel);
      write_bundle(p, part.params, initial.to(compute_dtype_));
      if (separate_master) write_bundle(p, part.master, initial.narrow(0, part.shard.begin, part.shard.numel));
    }
    if (part.frozen != kNoBundle) {
      write_frozen(*store_, part, config_, pack_slices(part.frozen_slices, part.frozen_numel));
    }
    if (streamed(p)) {
      // The module's own tensors are freed; each visit to the device binds the copy there.
      for (const auto* slices : {&part.slices, &part.frozen_slices}) {
        for (const ParameterSlice& slice : *slices) {
          slice.parameter.set_data(torch::empty({0}, torch::TensorOptions().dtype(compute_dtype_).device(config_.device)));
        }
      }
    } else {
      bind_device_copies(p, /*in_flight=*/false);
      unbind_decoded_base(p);  // a resident fp8 base is decoded at each visit
    }
  }
}

void FirstOrderTrainer::bind_device_copies(std::size_t p, bool in_flight) {
  const Part& part = parts_[p];
  if (part.trainable()) {
    bind_parameters(part, in_flight ? typed_device_view(*store_, part.params, compute_dtype_, part.numel)
                                    : view(part.params, Tier::kGpu, compute_dtype_, part.numel));
  }
  bind_frozen_device_copy(*store_, part, config_, in_flight);
}

// Note: a block's decoded fp8 base is working memory like its activations: the modules hold it
// from the block's visit until here (and autograd until the block's backward when it keeps its
// graph), never the whole base at once.
void FirstOrderTrainer::unbind_decoded_base(std::size_t p) {
  if (fp8_frozen(parts_[p], config_)) unbind_frozen(parts_[p], config_);
}

torch::Tensor FirstOrderTrainer::read_frozen(std::size_t p) { return detail::read_frozen(*store_, parts_[p], config_); }

BundleId FirstOrderTrainer::master_bundle(std::size_t p) const {
  return parts_[p].master != kNoBundle ? parts_[p].master : parts_[p].params;
}

torch::Tensor FirstOrderTrainer::master_view(std::size_t p) const {
  const Part& part = parts_[p];
  if (part.master != kNoBundle) return view(part.master, state_[p].update_tier(), torch::kFloat, part.shard.numel);
  return view(part.params, state_[p].update_tier(), torch::kFloat, part.numel)
      .narrow(0, part.shard.begin, part.shard.numel);
}

torch::Tensor FirstOrderTrainer::gather_shards(std::size_t p, const torch::Tensor& shard) {
  const Part& part = parts_[p];
  if (world_size(config_) == 1 || shard.numel() == part.numel) return shard;
  torch::Tensor whole = torch::empty({part.numel}, shard.options());
  whole.narrow(0, part.shard.begin, part.shard.numel).copy_(shard);
  config_.communicator->all_gather(whole, part.shard.padded);
  return whole;
}

void FirstOrderTrainer::gather_parameters(std::size_t p, const torch::Tensor& params) {
  if (world_size(config_) == 1) return;
  torch::Tensor flat = params;
  const dist::Group group = state_[p].cpu_updated() ? dist::Group::kUpdate : dist::Group::kMain;
  traced("gather " + parts_[p].name, Track::kOptimizer,
         [&] { config_.communicator->all_gather(flat, parts_[p].shard.padded, group); });
}

BundleId FirstOrderTrainer::gradient_bundle(std::size_t p) const {
  return parts_[p].accumulator != kNoBundle ? parts_[p].accumulator : parts_[p].grads;
}

torch::Tensor FirstOrderTrainer::gradient_view(std::size_t p) const {
  const BundleId id = gradient_bundle(p);
  return view(id, state_[p].update_tier(), id == parts_[p].accumulator ? torch::kFloat : compute_dtype_,
              parts_[p].numel);
}

// Note: an update may only start once nothing can still cancel or rescale it. Global-norm
// clipping needs every part's gradient norm, and a loss-scale overflow anywhere skips the whole
// step, so with either the CPU updates wait for the end of backward (the gradients still stream
// down and are measured during it), and a delayed update starts there too, to run during the
// next step. The device updates its own parts in step(), once it has read every part's
// finiteness: they cost the device the same time there as in backward, and the CPU worker runs
// its share meanwhile.
bool FirstOrderTrainer::update_waits_for_step(std::size_t p) const {
  return state_[p].home.updated_on_gpu() || config_.max_grad_norm > 0 || scaler_.enabled() || delays_update();
}

bool FirstOrderTrainer::delays_update() const {
  return config_.delayed_update.enabled && steps_ >= config_.delayed_update.warmup_steps;
}

// Note: a delayed update (ZeRO-Offload's DPU). step() of step t hands every CPU-updated part's
// update to the worker and returns; the worker writes the new parameters into the part's host
// copy (marked dirty) while the device runs step t+1 with the parameters of before step t. Once
// the part's last backward of step t+1 is queued, gradients_reduced waits for step t's update of
// the part (the host gradients it reads are about to be overwritten anyway) and sends the new
// parameters up behind that backward on the device's stream; the next forward waits for them
// (enter_part), and step t+1's update, which starts from them on the host, waits for the copy to
// leave the host copy (update). So step t+1's gradients are computed one update behind the master
// they are applied to, and the clip coefficient and the overflow check are over step t+1's
// gradients as usual. flush() waits for the updates and sends what is pending up at once.
void FirstOrderTrainer::upload_parameters(std::size_t p) {
  state_[p].upload = store_->write_back(parts_[p].params, Tier::kHost, Tier::kGpu);
  state_[p].stale_on_device = false;
}

// Note: save() and load() flush, so a checkpoint carries no staleness: the master it holds is
// what the next step computes with, in the saving run and in a resumed one alike, and the step
// count says whether warm-up is over. Keeping the trajectory of a run that never saves would mean
// saving the stale device parameters as well, a second copy of the model (docs/engine.md).
void FirstOrderTrainer::flush() {
  if (std::none_of(state_.begin(), state_.end(), [](const PartState& s) { return s.stale_on_device; })) return;
  FERRY_CHECK(!pending_ && micro_batches_ == 0, "flush() in the middle of a step (", micro_batches_, " of ",
              config_.grad_accumulation, " micro-batches done", pending_ ? ", a forward waiting for its backward" : "",
              "): a delayed update is pending, and every micro-batch of a step must see the same "
              "parameters; flush (or evaluate, or save) after step()");
  wait_for_workers();
  for (std::size_t p = 0; p < parts_.size(); ++p) {
    if (state_[p].stale_on_device) upload_parameters(p);
  }
}

// --- the update's staging -----------------------------------------------------------------------
// Note: only the worker stages, commits and releases, and only for the parts it updates; a part
// updated on the GPU has every bundle at home on the device, so these do nothing for it.

bool FirstOrderTrainer::staged_on_host(std::size_t p, BundleId id) const {
  return state_[p].cpu_updated() && store_->spec(id).home == Tier::kNvme;
}

Fence FirstOrderTrainer::stage(std::size_t p, BundleId id, bool overwrite) {
  const Tier tier = state_[p].update_tier();
  if (store_->spec(id).home == tier) return Fence();
  // A copy still going home from an earlier use is used again as it is.
  for (auto it = going_home_.begin(); it != going_home_.end(); ++it) {
    if (it->id != id) continue;
    it->fence.wait();
    going_home_.erase(it);
    break;
  }
  if (overwrite && store_->state(id, tier) == CopyState::kAbsent) {
    store_->allocate(id, tier);
    return Fence();
  }
  return store_->fetch(id, tier);
}

Fence FirstOrderTrainer::commit(std::size_t p, BundleId id) {
  const Tier tier = state_[p].update_tier();
  store_->mark_dirty(id, tier);
  const Tier home = store_->spec(id).home;
  if (home == tier) return Fence();
  Fence fence = store_->write_back(id, tier, home);
  if (staged_on_host(p, id)) going_home_.push_back({p, id, fence});
  return fence;
}

void FirstOrderTrainer::release_staged(std::size_t p, BundleId id) {
  if (staged_on_host(p, id) && store_->state(id, Tier::kHost) != CopyState::kAbsent) {
    store_->discard(id, Tier::kHost);
  }
}

void FirstOrderTrainer::release_going_home(std::size_t keep_part) {
  while (!going_home_.empty()) {
    const GoingHome& entry = going_home_.front();
    if (entry.part <= keep_part && !entry.fence.ready()) return;
    entry.fence.wait();
    store_->evict(entry.id, Tier::kHost);
    going_home_.pop_front();
  }
}

void FirstOrderTrainer::drain_going_home() {
  for (const GoingHome& entry : going_home_) {
    entry.fence.wait();
    store_->evict(entry.id, Tier::kHost);
  }
  going_home_.clear();
}

void FirstOrderTrainer::prefetch_optimizer_state(std::size_t p) {
  const Part& part = parts_[p];
  if (part.master != kNoBundle) stage(p, part.master, false);
  for (BundleId state : part.states) stage(p, state, false);
}

torch::Tensor FirstOrderTrainer::read_bundle(std::size_t p, BundleId id, torch::ScalarType dtype, std::int64_t numel) {
  const Tier tier = state_[p].update_tier();
  const bool absent = store_->state(id, tier) == CopyState::kAbsent;
  store_->fetch(id, tier).wait();
  torch::Tensor values = view(id, tier, dtype, numel).to(torch::kCPU, torch::kFloat, false, true);
  if (absent) store_->evict(id, tier);
  return values;
}

void FirstOrderTrainer::write_bundle(std::size_t p, BundleId id, const torch::Tensor& values) {
  torch::NoGradGuard no_grad;
  stage(p, id, /*overwrite=*/true).wait();
  view(id, state_[p].update_tier(), values.scalar_type(), values.numel()).copy_(values.reshape({-1}));
  commit(p, id).wait();
  drain_going_home();
}

// --- forward ------------------------------------------------------------------------------------

std::vector<std::vector<BundleId>> FirstOrderTrainer::parameter_visits(bool reverse) const {
  const std::size_t blocks = model_.num_blocks();
  std::vector<std::vector<BundleId>> visits(blocks);
  for (std::size_t k = 0; k < blocks; ++k) {
    const std::size_t p = (reverse ? blocks - 1 - k : k) + 1;
    if (!streamed(p)) continue;
    for (BundleId id : {parts_[p].params, parts_[p].frozen}) {
      if (id != kNoBundle) visits[k].push_back(id);
    }
  }
  return visits;
}

void FirstOrderTrainer::enter_part(std::size_t p) { state_[p].upload.order_current_stream(); }

void FirstOrderTrainer::enter_block(std::size_t block, std::size_t visit) {
  const std::size_t p = block + 1;
  window_->arrive(visit);
  enter_part(p);
  if (streamed(p) || fp8_frozen(parts_[p], config_)) bind_device_copies(p, /*in_flight=*/streamed(p));
}

void FirstOrderTrainer::size_checkpoints(std::uint64_t bytes) {
  // A larger micro-batch than any before: every checkpoint bundle is made again at the new size.
  if (bytes > checkpoints_.bytes) lay_out_checkpoints(*store_, parts_, placement_, config_, bytes, checkpoints_, nullptr);
}

void FirstOrderTrainer::save_checkpoint(std::size_t block, std::size_t micro_batch, const torch::Tensor& hidden,
                                        PendingBackward::SavedBlock& saved) {
  const BundleId id = checkpoints_.bundles[block * static_cast<std::size_t>(config_.grad_accumulation) + micro_batch];
  const Tier home = store_->spec(id).home;
  if (home != Tier::kGpu) store_->allocate(id, Tier::kGpu);
  view(id, Tier::kGpu, hidden.scalar_type(), hidden.numel()).copy_(hidden.reshape({-1}));
  store_->mark_dirty(id, Tier::kGpu);
  saved.checkpoint = id;
  if (home == Tier::kGpu) return;
  checkpoints_down_.emplace_back(id, store_->write_back(id, Tier::kGpu, home));
  release_checkpoints(kCheckpointsGoingDown);
}

void FirstOrderTrainer::release_checkpoints(std::size_t keep) {
  while (checkpoints_down_.size() > keep ||
         (!checkpoints_down_.empty() && checkpoints_down_.front().second.ready())) {
    const auto [id, fence] = checkpoints_down_.front();
    fence.wait();
    store_->evict(id, Tier::kGpu);
    if (store_->spec(id).home == Tier::kNvme) store_->evict(id, Tier::kHost);
    checkpoints_down_.pop_front();
  }
}

void FirstOrderTrainer::start_step() {
  if (micro_batches_ > 0) return;
  step_lr_ = scheduled_lr(config_.schedule, config_.optimizer.lr, steps_ + 1);
  step_loss_sum_ = torch::Tensor();
  step_tokens_ = 0;
}

PendingBackward FirstOrderTrainer::prepare_micro_batch(const data::Batch& batch, std::int64_t micro_batch) const {
  PendingBackward saved;
  saved.tokens = batch.input_ids.to(config_.device, torch::kLong);
  saved.labels = batch.labels.to(config_.device, torch::kLong);
  torch::Tensor mask = device_padding_mask(batch.attention_mask, config_.device);
  saved.context = model_.make_context(saved.tokens, mask, batch.position_ids);
  saved.context.dropout.training = true;
  saved.context.dropout.seed = config_.dropout.seed;
  saved.context.dropout.step = steps_ + 1;
  saved.context.dropout.micro_batch = micro_batch;
  saved.token_count = saved.tokens.numel();
  return saved;
}

void FirstOrderTrainer::forward_blocks(std::vector<PendingBackward>& micro) {
  release_checkpoints(0);
  window_->begin(parameter_visits(/*reverse=*/false));
  enter_part(0);
  std::vector<torch::Tensor> hidden;
  std::uint64_t checkpoint_size = 0;
  for (PendingBackward& saved : micro) {
    computed(0, true, [&] { saved.stem_output = model_.stem()->forward(saved.tokens, saved.context); });
    hidden.push_back(saved.stem_output.detach());
    saved.hidden_shape = hidden.back().sizes().vec();
    checkpoint_size = std::max<std::uint64_t>(checkpoint_size, hidden.back().numel() * hidden.back().element_size());
  }
  size_checkpoints(checkpoint_size);
  for (std::size_t i = 0; i < model_.num_blocks(); ++i) {
    enter_block(i, i);
    for (std::size_t m = 0; m < micro.size(); ++m) {
      PendingBackward::SavedBlock block;
      if (!placement_.activations[i].recompute) {
        block.input = hidden[m].detach().requires_grad_(true);
        computed(i + 1, true, [&] { block.output = model_.blocks()[i]->forward(block.input, micro[m].context); });
        hidden[m] = block.output.detach();
      } else {
        save_checkpoint(i, m, hidden[m], block);
        torch::NoGradGuard no_grad;
        computed(i + 1, true, [&] { hidden[m] = model_.blocks()[i]->forward(hidden[m], micro[m].context); });
      }
      micro[m].blocks.push_back(std::move(block));
    }
    window_->depart(i, {});
    unbind_decoded_base(i + 1);
  }
  window_->finish();
  for (std::size_t m = 0; m < micro.size(); ++m) micro[m].head_input = hidden[m].detach().requires_grad_(true);
}

void FirstOrderTrainer::forward_head(PendingBackward& saved) {
  enter_part(parts_.size() - 1);
  computed(parts_.size() - 1, true, [&] {
    saved.loss = model_.loss(model_.head()->forward(saved.head_input, saved.context), saved.labels);
  });
}

torch::Tensor FirstOrderTrainer::forward(const data::Batch& batch) {
  FERRY_CHECK(!pending_, "forward() was called twice without backward() in between");
  check_batch_major("forward()");
  FERRY_CHECK(micro_batches_ < config_.grad_accumulation, "forward() after ", micro_batches_,
              " micro-batches: call step() every grad_accumulation = ", config_.grad_accumulation,
              " micro-batches");
  auto start = Clock::now();
  std::vector<PendingBackward> micro;
  micro.push_back(prepare_micro_batch(batch, micro_batches_));
  start_step();
  forward_blocks(micro);
  forward_head(micro.front());
  pending_ = std::move(micro.front());
  stats_.forward_seconds += seconds_since(start);
  return pending_->loss;
}

void FirstOrderTrainer::check_batch_major(const char* call) const {
  FERRY_CHECK(config_.micro_batch_order == MicroBatchOrder::kBatchMajor, call,
              " is not available with micro_batch_order layer-major: a step's micro-batches pass "
              "through each block together; call train_step(batch) for each micro-batch");
}

// --- backward -----------------------------------------------------------------------------------

// Note: autograd owns the parameters' .grad and hands over its own buffers; once a part's
// backward is done they are copied into the part's flat gradient bundle (4 bytes a bf16 parameter)
// and dropped. A .grad bound to views of the bundle would instead make autograd add into it and
// the step zero it: 8 bytes, and twice the kernels (docs/engine.md, "One step, every mode").
void FirstOrderTrainer::collect_gradients(std::size_t p) {
  torch::NoGradGuard no_grad;
  const Part& part = parts_[p];
  if (!part.trainable()) return;
  torch::Tensor grads = view(part.grads, Tier::kGpu, compute_dtype_, part.numel);
  for (const ParameterSlice& slice : part.slices) {
    torch::Tensor into = grads.narrow(0, slice.offset, slice.numel);
    const torch::Tensor& grad = slice.parameter.grad();
    if (grad.defined()) {
      into.copy_(grad.reshape({-1}));
    } else {
      into.zero_();  // not used by this micro-batch's loss
    }
    slice.parameter.mutable_grad() = torch::Tensor();
  }
}

void FirstOrderTrainer::release_gradients(std::size_t keep) {
  while (gradients_on_device_.size() > keep ||
         (!gradients_on_device_.empty() && state_[gradients_on_device_.front().first].gradients_down.ready())) {
    const auto [p, id] = gradients_on_device_.front();
    state_[p].gradients_down.wait();
    // Scratch once down: the optimizer may already have consumed and dropped the host copy.
    store_->discard(id, Tier::kGpu);
    gradients_on_device_.pop_front();
  }
}

void FirstOrderTrainer::prepare_gradients(std::size_t p) {
  if (!parts_[p].trainable() || !state_[p].cpu_updated()) return;  // none, or they live on the device
  // A fresh device copy for this micro-batch's gradients of the part (collect_gradients fills
  // it), once at most kGradientsGoingDown earlier parts' are still going down (the stem's, kept
  // for a tied head, aside).
  release_gradients(kGradientsGoingDown);
  // The worker may still be reading the part's host gradients: adding up the previous
  // micro-batch's, or, with a delayed update, updating with the previous step's.
  wait_for_part(p);
  store_->allocate(parts_[p].grads, Tier::kGpu);
}

void FirstOrderTrainer::limit_gradients_ahead(std::size_t p) {
  const Part& part = parts_[p];
  const bool waits_in_staging = staged_on_host(p, part.grads) || staged_on_host(p, part.params) ||
                                (part.accumulator != kNoBundle && staged_on_host(p, part.accumulator));
  if (!waits_in_staging) return;  // what the worker needs of it waits at home
  while (gradients_waiting_.size() > kGradientsAhead) {
    state_[gradients_waiting_.front()].work.wait();
    gradients_waiting_.pop_front();
  }
}

void FirstOrderTrainer::begin_backward() {
  release_gradients(0);    // the previous micro-batch's device gradients are all down
  release_checkpoints(0);  // the window brings them back
  const std::size_t head = parts_.size() - 1;
  if (micro_batches_ + 1 >= config_.grad_accumulation && parts_[head].trainable() && !update_waits_for_step(head)) {
    worker_.submit([this, head] { prefetch_optimizer_state(head); });
  }
  // The stem's gradients collect from the head too when the embedding is tied.
  prepare_gradients(0);
  prepare_gradients(head);
}

void FirstOrderTrainer::backward_head(PendingBackward& saved) {
  // Each rank's share of the step's mean loss: the gradients summed across ranks are the mean's.
  const double share = static_cast<double>(config_.grad_accumulation) * world_size(config_);
  torch::Tensor scaled = saved.loss * (scaler_.scale() / share);
  computed(parts_.size() - 1, false, [&] { torch::autograd::backward({scaled}); });
  saved.gradient = saved.head_input.grad();
  // Summed on the device and read once in step(): a read here would stall the host until the
  // device caught up, and it could no longer queue work ahead.
  torch::Tensor loss_value = saved.loss.detach().to(torch::kDouble);
  step_loss_sum_ = step_loss_sum_.defined() ? step_loss_sum_ + loss_value : loss_value;
  step_tokens_ += saved.token_count;
}

void FirstOrderTrainer::backward_blocks(std::vector<PendingBackward>& micro, bool summed) {
  const std::size_t blocks = model_.num_blocks();
  const bool last = micro_batches_ + 1 >= config_.grad_accumulation;
  // Each block's visit brings its parameters and its checkpoints back to the device. When the
  // update follows at once, the CPU optimizer writes the new parameters into their host staging.
  std::vector<std::vector<BundleId>> visits = parameter_visits(/*reverse=*/true);
  std::vector<BundleId> keep_staging;
  for (std::size_t k = 0; k < blocks; ++k) {
    const std::size_t i = blocks - 1 - k;
    for (const PendingBackward& saved : micro) {
      const BundleId checkpoint = saved.blocks[i].checkpoint;
      if (checkpoint != kNoBundle && store_->spec(checkpoint).home != Tier::kGpu) visits[k].push_back(checkpoint);
    }
    const std::size_t p = i + 1;
    if (last && parts_[p].trainable() && !update_waits_for_step(p) && staged_on_host(p, parts_[p].params)) {
      keep_staging.push_back(parts_[p].params);
    }
  }
  window_->begin(std::move(visits), std::move(keep_staging));
  for (std::size_t k = 0; k < blocks; ++k) {
    const std::size_t i = blocks - 1 - k;
    prepare_gradients(i + 1);
    enter_block(i, k);
    for (std::size_t m = 0; m < micro.size(); ++m) {
      PendingBackward& saved = micro[m];
      PendingBackward::SavedBlock& block = saved.blocks[i];
      computed(i + 1, false, [&] {
        if (!block.output.defined()) {
          torch::Tensor input = block.input;
          if (block.checkpoint != kNoBundle) {
            const std::int64_t numel = c10::multiply_integers(saved.hidden_shape);
            input = typed_device_view(*store_, block.checkpoint, saved.stem_output.scalar_type(), numel)
                        .view(saved.hidden_shape);
          }
          block.input = input.to(config_.device, /*non_blocking=*/true).detach().requires_grad_(true);
          block.output = model_.blocks()[i]->forward(block.input, saved.context);
        }
        torch::autograd::backward({block.output}, {saved.gradient});
      });
      saved.gradient = block.input.grad();
      block = {};
      if (summed) fold_gradients(i + 1, m == 0);
    }
    // Its uploads are done before the optimizer writes into their host staging.
    window_->settle(k);
    window_->depart(k, {});
    unbind_decoded_base(i + 1);
    gradients_ready(i + 1, summed);
  }
  window_->finish();
}

void FirstOrderTrainer::backward_stem(std::vector<PendingBackward>& micro, bool summed) {
  for (PendingBackward& saved : micro) {
    if (!saved.stem_output.requires_grad()) break;  // a frozen stem
    computed(0, false, [&] { torch::autograd::backward({saved.stem_output}, {saved.gradient}); });
    if (summed) fold_gradients(0, false);  // the head's backward began the stem's sum
  }
  gradients_ready(0, summed);
  finish_reductions(0);
}

void FirstOrderTrainer::backward(const torch::Tensor& loss) {
  FERRY_CHECK(pending_, "backward() needs a forward() first");
  FERRY_CHECK(loss.is_same(pending_->loss), "backward() takes the loss that forward() returned");
  auto start = Clock::now();
  std::vector<PendingBackward> micro;
  micro.push_back(std::move(*pending_));
  pending_.reset();
  begin_backward();
  backward_head(micro.front());
  gradients_ready(parts_.size() - 1, false);
  backward_blocks(micro, false);
  backward_stem(micro, false);
  ++micro_batches_;
  stats_.backward_seconds += seconds_since(start);
}

// Note: GreedySnake's layer-major order (arXiv 2512.17570). All of a step's micro-batches pass
// through a block before the next block comes: forward keeps every micro-batch's checkpoint of
// the block, the head runs forward and backward per micro-batch at once (its logits are the
// largest activation), and backward runs every micro-batch through a block while its parameters
// are on the device. Each part's gradients are summed on the device in fp32 (its accumulator's
// device copy: fold_gradients) and go down once, so per step the parameters, gradients and
// optimizer states cross NVMe and PCIe once instead of once per micro-batch.
StepResult FirstOrderTrainer::train_layer_major(const std::vector<data::Batch>& batches) {
  auto start = Clock::now();
  std::vector<PendingBackward> micro;
  for (const data::Batch& batch : batches) {
    micro.push_back(prepare_micro_batch(batch, static_cast<std::int64_t>(micro.size())));
  }
  start_step();
  forward_blocks(micro);
  stats_.forward_seconds += seconds_since(start);
  start = Clock::now();
  micro_batches_ = config_.grad_accumulation - 1;  // what follows is the step's last backward
  begin_backward();
  for (std::size_t m = 0; m < micro.size(); ++m) {
    forward_head(micro[m]);
    backward_head(micro[m]);
    fold_gradients(parts_.size() - 1, m == 0);
    fold_gradients(0, m == 0);
  }
  gradients_ready(parts_.size() - 1, true);
  backward_blocks(micro, true);
  backward_stem(micro, true);
  micro_batches_ = config_.grad_accumulation;
  stats_.backward_seconds += seconds_since(start);
  return step();
}

void FirstOrderTrainer::fold_gradients(std::size_t p, bool first) {
  const Part& part = parts_[p];
  if (!part.trainable()) return;
  collect_gradients(p);
  torch::NoGradGuard no_grad;
  if (store_->state(part.accumulator, Tier::kGpu) == CopyState::kAbsent) store_->allocate(part.accumulator, Tier::kGpu);
  torch::Tensor sum = view(part.accumulator, Tier::kGpu, torch::kFloat, part.numel);
  torch::Tensor grads = view(part.grads, Tier::kGpu, compute_dtype_, part.numel);
  if (first) {
    sum.copy_(grads);
  } else {
    sum.add_(grads);
  }
}

// Note: data parallelism, ZeRO stage 2 (docs/distributed.md). A part's gradients are
// reduce-scattered on the device as soon as its backward has produced them, before they are
// accumulated, measured or sent down: afterwards only this rank's shard (Part::shard) of them is
// the sum over the ranks, and only it is measured and read by the update, which changes this
// rank's shard of the master and states; update() then all-gathers the parameters. The norm and
// the overflow flags are the shards' summed in step(). Every rank starts the reductions in the
// same order, from this thread only (backward order, stem last), as c10d requires; batch-major
// accumulation reduces each micro-batch's gradients, layer-major the step's sum once. Nothing
// touches a part's gradients between the start of its reduction and gradients_reduced.
void FirstOrderTrainer::gradients_ready(std::size_t p, bool summed) {
  const Part& part = parts_[p];
  if (!part.trainable()) return;
  if (!summed) collect_gradients(p);
  if (world_size(config_) == 1) return gradients_reduced(p, summed);
  torch::Tensor gradients = summed ? view(part.accumulator, Tier::kGpu, torch::kFloat, part.numel)
                                   : view(part.grads, Tier::kGpu, compute_dtype_, part.numel);
  state_[p].reduction = config_.communicator->start_reduce_scatter_sum(gradients, part.shard.padded);
  reducing_.emplace_back(p, summed);
  finish_reductions(kReductionsInFlight);
}

void FirstOrderTrainer::finish_reductions(std::size_t keep) {
  while (reducing_.size() > keep) {
    const auto [p, summed] = reducing_.front();
    reducing_.pop_front();
    traced("reduce " + parts_[p].name, Track::kCompute, [&] { state_[p].reduction.wait(); });
    gradients_reduced(p, summed);
  }
}

void FirstOrderTrainer::gradients_reduced(std::size_t p, bool summed) {
  const bool first = micro_batches_ == 0;
  const bool last = micro_batches_ + 1 == config_.grad_accumulation;
  const Part& part = parts_[p];
  PartState& state = state_[p];
  if (!state.cpu_updated()) {
    accumulate_and_measure(p, first, last, summed);
    return;
  }
  // What goes down: this micro-batch's gradients, or the step's fp32 sum of them.
  const BundleId down = summed ? part.accumulator : part.grads;
  limit_gradients_ahead(p);
  wait_for_part(p);  // done with the host copy the gradients go down into
  store_->mark_dirty(down, Tier::kGpu);  // autograd (or fold_gradients) wrote the device copy
  // Measured on the device as they go down: the worker then reads two numbers, not the gradients.
  if (last && (first || summed) && config_.device.is_cuda()) {
    state.device_stats = measure_on_device(view(down, Tier::kGpu, summed ? torch::kFloat : compute_dtype_, part.numel)
                                               .narrow(0, part.shard.begin, part.shard.numel));
  }
  state.gradients_down = store_->write_back(down, Tier::kGpu, Tier::kHost);
  // The step's last use of the part's parameters is queued: the delayed update may go up.
  if (last && state.stale_on_device) upload_parameters(p);
  gradients_on_device_.push_back({p, down});
  if (summed) store_->discard(part.grads, Tier::kGpu);  // scratch once folded
  const bool update_now = last && !update_waits_for_step(p);
  const std::int64_t step = steps_ + 1;
  const double lr = step_lr_;
  const auto sent = Tracer::Clock::now();
  state.work = worker_.submit([this, p, first, last, summed, update_now, step, lr, sent] {
    PartState& state = state_[p];
    state.gradients_down.wait();
    tracer_->record(parts_[p].name + " gradients", Track::kGradientsDown, sent, Tracer::Clock::now());
    traced("update " + parts_[p].name, Track::kOptimizer, [&] {
      release_going_home(p + 1);
      accumulate_and_measure(p, first, last, summed);
      const BundleId gradient = gradient_bundle(p);
      if (!update_now) {
        // Kept at home until the next micro-batch adds to them or step() updates with them.
        if (staged_on_host(p, gradient)) commit(p, gradient);
        return;
      }
      // Without loss scaling a part whose shard is non-finite is left as is; its parameters are
      // still gathered, as every rank's are.
      state.updated = true;
      update(p, {step, lr, 1.0, 1.0, true}, true, state.stats.finite);
    });
  });
  gradients_waiting_.push_back(p);
}

void FirstOrderTrainer::accumulate_and_measure(std::size_t p, bool first_micro_batch, bool last_micro_batch,
                                               bool summed_on_device) {
  const Part& part = parts_[p];
  PartState& state = state_[p];
  const Tier tier = state.update_tier();
  if (part.accumulator != kNoBundle && !summed_on_device) {
    torch::NoGradGuard no_grad;
    stage(p, part.accumulator, /*overwrite=*/first_micro_batch).wait();
    torch::Tensor sum = view(part.accumulator, tier, torch::kFloat, part.numel);
    torch::Tensor grads = view(part.grads, tier, compute_dtype_, part.numel);
    if (first_micro_batch) {
      sum.copy_(grads);
    } else {
      sum.add_(grads);
    }
    release_staged(p, part.grads);
  }
  if (!last_micro_batch) return;
  if (state.cpu_updated() && state.device_stats.defined()) {
    // Note: measured on the stream before the gradients' copy down, which the worker has awaited.
    state.stats = measured_stats(state.device_stats);
    state.device_stats = torch::Tensor();
    return;
  }
  torch::Tensor grad = gradient_view(p).narrow(0, part.shard.begin, part.shard.numel);
  if (grad.device().is_cpu()) {
    state.stats = gradient_stats(grad);
  } else {
    state.device_stats = measure_on_device(grad);  // read in step()
  }
}

bool FirstOrderTrainer::update(std::size_t p, const UpdateContext& context, bool upload, bool finite) {
  auto start = Clock::now();
  const Part& part = parts_[p];
  PartState& state = state_[p];
  const Tier tier = state.update_tier();
  if (state.cpu_updated()) {
    release_going_home(p + 1);
    // The last upload still reads the host copy of the parameters (with a delayed update it
    // left during this step's backward): staging may not fetch into it, nor the update
    // overwrite it.
    state.upload.wait();
  }
  const BundleId master = master_bundle(p);
  const BundleId gradient = gradient_bundle(p);
  std::vector<Fence> staged{stage(p, master, false), stage(p, gradient, false)};
  for (BundleId id : part.states) staged.push_back(stage(p, id, false));
  if (part.master != kNoBundle) staged.push_back(stage(p, part.params, /*overwrite=*/true));
  // The next part the worker updates (backward order) has its optimizer state read meanwhile.
  if (state.cpu_updated()) {
    for (std::size_t next = p; next-- > 0;) {
      if (!state_[next].cpu_updated()) continue;
      prefetch_optimizer_state(next);
      break;
    }
  }
  for (const Fence& fence : staged) fence.wait();

  const Shard& shard = part.shard;
  PartUpdate update;
  update.master = master_view(p);
  for (BundleId id : part.states) update.states.push_back(view(id, tier, torch::kFloat, shard.numel));
  update.grad = gradient_view(p).narrow(0, shard.begin, shard.numel);
  const torch::Tensor params = view(part.params, tier, compute_dtype_, part.numel);
  if (part.master != kNoBundle) update.output = params.narrow(0, shard.begin, shard.numel);
  update.decay_numel = std::clamp<std::int64_t>(part.decay_numel - shard.begin, 0, shard.numel);
  const auto arithmetic = Clock::now();
  const bool skipped = !finite || apply_update(config_.optimizer, context, update);
  const double arithmetic_seconds = seconds_since(arithmetic);
  release_staged(p, gradient);
  if (skipped && world_size(config_) > 1) {
    // The parameters were staged to be overwritten: this rank's shard of them is its master's.
    torch::NoGradGuard no_grad;
    if (update.output.defined()) update.output.copy_(update.master);
  }
  gather_parameters(p, params);
  if (skipped && world_size(config_) == 1) {
    release_staged(p, master);
    for (BundleId id : part.states) release_staged(p, id);
    release_staged(p, part.params);
  } else {
    for (BundleId id : part.states) commit(p, id);
    if (part.master != kNoBundle) commit(p, part.master);
    if (upload) {
      Fence uploaded = commit(p, part.params);
      if (state.home.params == Tier::kGpu) state.upload = uploaded;
    } else {
      store_->mark_dirty(part.params, tier);  // upload_parameters sends it up
    }
  }
  std::lock_guard<std::mutex> lock(stats_mutex_);
  stats_.optimizer_seconds += seconds_since(start);
  if (state.cpu_updated() && !skipped) {
    stats_.cpu_update_seconds += arithmetic_seconds;
    stats_.cpu_updated_elements += shard.numel;
  }
  return skipped;
}

void FirstOrderTrainer::read_device_stats() {
  const bool pending = std::any_of(state_.begin(), state_.end(),
                                   [](const PartState& s) { return s.device_stats.defined(); });
  if (!pending) return;
  wait_for_current_stream(config_.device);
  for (PartState& state : state_) {
    if (!state.device_stats.defined()) continue;
    state.stats = measured_stats(state.device_stats);
    state.device_stats = torch::Tensor();
  }
}

// Each rank measured its shards of the gradients: the step's norm and overflow flags are their sums.
void FirstOrderTrainer::reduce_gradient_stats() {
  if (world_size(config_) == 1) return;
  torch::Tensor stats = torch::empty({static_cast<std::int64_t>(2 * state_.size())}, torch::kDouble);
  double* values = stats.data_ptr<double>();
  for (std::size_t p = 0; p < state_.size(); ++p) {
    values[2 * p] = state_[p].stats.sum_squares;
    values[2 * p + 1] = state_[p].stats.finite ? 0 : 1;
  }
  sum_across_ranks(config_, stats);
  for (std::size_t p = 0; p < state_.size(); ++p) state_[p].stats = {values[2 * p], values[2 * p + 1] == 0};
}

void FirstOrderTrainer::wait_for_part(std::size_t p) {
  if (!state_[p].work.valid()) return;
  auto start = Clock::now();
  state_[p].work.wait();
  stats_.optimizer_wait_seconds += seconds_since(start);
}

void FirstOrderTrainer::wait_for_workers() {
  auto start = Clock::now();
  for (PartState& state : state_) {
    if (state.work.valid()) state.work.get();
  }
  gradients_waiting_.clear();
  drain_going_home();  // the worker is idle: what it staged leaves the host
  stats_.optimizer_wait_seconds += seconds_since(start);
}

// --- step ---------------------------------------------------------------------------------------

std::optional<StepResult> FirstOrderTrainer::train_step(const data::Batch& batch) {
  if (config_.micro_batch_order == MicroBatchOrder::kLayerMajor) {
    buffered_.push_back(batch);
    if (static_cast<std::int64_t>(buffered_.size()) < config_.grad_accumulation) return std::nullopt;
    std::vector<data::Batch> batches = std::move(buffered_);
    buffered_.clear();
    return train_layer_major(batches);
  }
  backward(forward(batch));
  if (micro_batches_ < config_.grad_accumulation) return std::nullopt;
  return step();
}

StepResult FirstOrderTrainer::step() {
  FERRY_CHECK(!pending_, "step() between forward() and backward(): call backward() first");
  FERRY_CHECK(micro_batches_ == config_.grad_accumulation, "step() after ", micro_batches_,
              " micro-batches; grad_accumulation is ", config_.grad_accumulation);
  wait_for_workers();
  release_gradients(0);
  read_device_stats();
  reduce_gradient_stats();

  StepResult result;
  // The loss and tokens of every rank's rows: the mean loss, the sum of tokens.
  torch::Tensor totals =
      torch::tensor({step_loss_sum_.item<double>(), static_cast<double>(step_tokens_)}, torch::kDouble);
  sum_across_ranks(config_, totals);
  result.loss = totals[0].item<double>() / static_cast<double>(micro_batches_ * world_size(config_));
  result.lr = step_lr_;
  result.loss_scale = scaler_.scale();
  result.tokens = static_cast<std::int64_t>(totals[1].item<double>());
  double sum_squares = 0;
  bool finite = true;
  for (const PartState& state : state_) {
    sum_squares += state.stats.sum_squares;
    finite = finite && state.stats.finite;
  }
  const double grad_norm = std::sqrt(sum_squares) / scaler_.scale();
  result.grad_norm = finite ? grad_norm : std::numeric_limits<double>::quiet_NaN();
  // Note: a non-finite gradient skips the whole step, in every precision, unless some part took
  // its update during backward already (no clipping, no loss scaling: a CPU-updated part updates
  // as soon as its gradient is ready); then the finite parts update and the others are left as
  // they are. `skipped` says that nothing was updated, which the CLI's metrics record.
  const bool applied_in_backward =
      std::any_of(state_.begin(), state_.end(), [](const PartState& s) { return s.updated && s.stats.finite; });
  result.skipped = !finite && (scaler_.enabled() || !applied_in_backward);

  const bool delayed = delays_update();
  if (!result.skipped) {
    double clip_coef = 1.0;
    if (config_.max_grad_norm > 0 && finite) clip_coef = std::min(1.0, config_.max_grad_norm / (grad_norm + 1e-6));
    const UpdateContext context{steps_ + 1, step_lr_, scaler_.scale(), clip_coef, true};
    // A non-finite part is left as is (see above). The worker's share goes first, in
    // backward order as it stages them, so that it runs while the device updates its parts.
    auto waiting = [&](std::size_t p) {
      return parts_[p].trainable() && !state_[p].updated && state_[p].stats.finite;
    };
    for (std::size_t p = parts_.size(); p-- > 0;) {
      if (!waiting(p) || !state_[p].cpu_updated()) continue;
      state_[p].work = worker_.submit([this, p, context, delayed] {
        traced("update " + parts_[p].name, Track::kOptimizer, [&] { update(p, context, !delayed); });
      });
      state_[p].stale_on_device = delayed;
    }
    for (std::size_t p = parts_.size(); p-- > 0;) {
      if (!waiting(p) || state_[p].cpu_updated()) continue;
      traced("update " + parts_[p].name, Track::kOptimizer, [&] { update(p, context, true); });
    }
    if (!delayed) wait_for_workers();
  }
  scaler_.update(!finite);
  for (PartState& state : state_) state.updated = false;
  micro_batches_ = 0;
  result.step = ++steps_;
  stats_.steps = steps_;
  return result;
}

torch::Tensor FirstOrderTrainer::logits(const torch::Tensor& tokens, const torch::Tensor& padding_mask,
                                        const torch::Tensor& position_ids) {
  FERRY_CHECK(!pending_, "inference between forward() and backward(): call backward() first");
  flush();
  torch::NoGradGuard no_grad;
  torch::Tensor input = tokens.to(config_.device, torch::kLong);
  torch::Tensor mask = device_padding_mask(padding_mask, config_.device);
  StepContext context = model_.make_context(input, mask, position_ids);
  window_->begin(parameter_visits(/*reverse=*/false));
  enter_part(0);
  torch::Tensor hidden = model_.stem()->forward(input, context);
  for (std::size_t i = 0; i < model_.num_blocks(); ++i) {
    enter_block(i, i);
    hidden = model_.blocks()[i]->forward(hidden, context);
    window_->depart(i, {});
    unbind_decoded_base(i + 1);
  }
  window_->finish();
  enter_part(parts_.size() - 1);
  return model_.head()->forward(hidden, context);
}

// --- checkpoints --------------------------------------------------------------------------------

void FirstOrderTrainer::quiesce(const char* call) {
  FERRY_CHECK(!pending_ && micro_batches_ == 0 && buffered_.empty(), call, " in the middle of a step (",
              micro_batches_, " of ", config_.grad_accumulation, " micro-batches done): call it after step()");
  flush();
  wait_for_workers();
  store_->synchronize();
}

nlohmann::json FirstOrderTrainer::checkpoint_state() const {
  return {{"step", steps_},
          {"mode", to_string(config_.mode)},
          {"precision", to_string(config_.precision)},
          {"loss_scale", scaler_.raw_scale()},
          {"loss_scale_clean_steps", scaler_.clean_steps()}};
}

void FirstOrderTrainer::restore_state(const nlohmann::json& state) {
  steps_ = state.value("step", std::int64_t{0});
  stats_.steps = steps_;
  scaler_.restore(state.value("loss_scale", scaler_.raw_scale()), state.value("loss_scale_clean_steps", std::int64_t{0}));
}

PartValues FirstOrderTrainer::read_part(std::size_t p, bool with_states) {
  if (!parts_[p].trainable()) {
    return {torch::empty({0}, torch::kFloat),
            std::vector<torch::Tensor>(with_states ? state_count() : 0, torch::empty({0}, torch::kFloat))};
  }
  // Note: a collective when the world has several ranks (the shards are gathered): every rank
  // reads every trainable part, in the same order.
  const Part& part = parts_[p];
  const std::int64_t master_numel = part.master != kNoBundle ? part.shard.numel : part.numel;
  PartValues values{gather_shards(p, read_bundle(p, master_bundle(p), torch::kFloat, master_numel)), {}};
  if (with_states) {
    for (BundleId id : part.states) {
      values.states.push_back(gather_shards(p, read_bundle(p, id, torch::kFloat, part.shard.numel)));
    }
  }
  return values;
}

void FirstOrderTrainer::write_part(std::size_t p, const PartValues& values) {
  const Part& part = parts_[p];
  if (!part.trainable()) return;
  auto shard = [&](const torch::Tensor& whole) { return whole.reshape({-1}).narrow(0, part.shard.begin, part.shard.numel); };
  write_bundle(p, master_bundle(p), part.master != kNoBundle ? shard(values.weights) : values.weights);
  for (std::size_t i = 0; i < part.states.size(); ++i) write_bundle(p, part.states[i], shard(values.states[i]));
  if (part.master != kNoBundle) write_bundle(p, part.params, values.weights.to(compute_dtype_));
}

PartShard FirstOrderTrainer::read_shard(std::size_t p, bool with_parameters) {
  const Part& part = parts_[p];
  FERRY_ASSERT(part.trainable(), part.name, " has no trainable parameters, so no shard");
  PartShard values;
  if (with_parameters) values.parameters = read_bundle(p, part.params, compute_dtype_, part.numel);
  if (part.master != kNoBundle) values.master = read_bundle(p, part.master, torch::kFloat, part.shard.numel);
  for (BundleId id : part.states) values.states.push_back(read_bundle(p, id, torch::kFloat, part.shard.numel));
  return values;
}

void FirstOrderTrainer::write_shard(std::size_t p, const PartShard& values) {
  const Part& part = parts_[p];
  FERRY_ASSERT(part.trainable() && values.parameters.numel() == part.numel &&
                   values.master.defined() == (part.master != kNoBundle) && values.states.size() == part.states.size(),
               part.name, " takes its whole parameters, ", part.states.size(), " states and ",
               part.master != kNoBundle ? "a" : "no", " master shard");
  write_bundle(p, part.params, values.parameters.to(compute_dtype_));
  if (part.master != kNoBundle) write_bundle(p, part.master, values.master);
  for (std::size_t i = 0; i < part.states.size(); ++i) write_bundle(p, part.states[i], values.states[i]);
}

EngineStats FirstOrderTrainer::stats() const {
  EngineStats stats;
  {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    stats = stats_;
  }
  stats.store = store_->stats();
  return stats;
}

std::unique_ptr<Trainer> make_first_order_trainer(LayeredModel model, EngineConfig config) {
  return std::make_unique<FirstOrderTrainer>(std::move(model), std::move(config));
}

}  // namespace ferry::detail
