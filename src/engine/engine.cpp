#include <torch/autograd.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "engine/engine_impl.h"
#include "engine/sizing.h"
#include "engine/stage.h"
#include "engine/zo2.h"
#include "ferry/check.h"

namespace ferry {
namespace detail {

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

}  // namespace detail

namespace {

using detail::Part;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

Engine::Impl::Impl(LayeredModel model_in, EngineConfig config_in)
    : model(std::move(model_in)),
      config(std::move(config_in)),
      compute_dtype(detail::scalar_type(config.precision)),
      optimizer_tier(config.mode == Mode::kGpu ? Tier::kGpu : Tier::kHost),
      scaler(config.loss_scale, config.loss_scale.enabled.value_or(config.precision == Precision::kF16)),
      tracer(std::make_shared<detail::Tracer>(config.trace)) {
  if (!config.staged.empty()) staged = detail::open_staged_layout(config);
  detail::validate(config);
  if (config.device.is_cuda() && !config.device.has_index()) config.device = torch::Device(torch::kCUDA, 0);
  if (config.optimizer_threads > 0) optim::set_num_threads(config.optimizer_threads);
  parts = detail::describe_parts(model);
  activations = detail::block_activations(config, static_cast<std::int64_t>(model.num_blocks()));
  for (const Part& part : parts) homes.push_back(detail::part_homes(config, part.kind, part.index));
  if (staged) detail::check_staged_layout(*staged, parts, config);
  TierDemand needed = demand();
  detail::check_budgets(needed, config);
  StoreOptions store_options = detail::store_options(config);
  detail::trace_transfers(store_options, tracer);
  store = std::make_unique<Store>(store_options);
  window = std::make_unique<detail::DeviceWindow>(
      *store, config.mode == Mode::kFuyou ? static_cast<std::size_t>(config.fuyou.blocks_in_flight) : 2);
  checkpoints.assign(model.num_blocks() * static_cast<std::size_t>(config.grad_accumulation), detail::kNoBundle);

  const std::size_t count = parts.size();
  part_stats.assign(count, {});
  device_stats.assign(count, torch::Tensor());
  part_updated.assign(count, false);
  uploads.assign(count, Fence());
  stale_on_device.assign(count, false);
  gradients_down.assign(count, Fence());
  part_work.assign(count, {});
  allocate_and_bind();
  if (staged) {
    detail::mark_staged_live(std::move(*staged), config.staged);
    staged.reset();
  }
  model.train(true);
}

Engine::Impl::~Impl() {
  for (auto& work : part_work) {
    if (work.valid()) work.wait();
  }
}

TierDemand Engine::Impl::demand() const {
  std::vector<PartShape> shapes;
  for (const Part& part : parts) shapes.push_back({part.name, part.numel});
  return engine_demand(shapes, config);
}

torch::Tensor Engine::Impl::view(BundleId id, Tier tier, torch::ScalarType dtype,
                                 std::int64_t numel) const {
  return detail::typed_view(*store, id, tier, dtype, numel);
}

void Engine::Impl::allocate_and_bind() {
  torch::NoGradGuard no_grad;
  const bool separate_master = compute_dtype != torch::kFloat;
  detail::move_buffers(model, config.device);

  for (std::size_t p = 0; p < parts.size(); ++p) {
    Part& part = parts[p];
    detail::add_bundles(part, homes[p], config, [&](const BundleSpec& spec) {
      return staged && spec.home == Tier::kNvme ? detail::adopt_staged(*store, *staged, spec)
                                                : store->add(spec);
    });
    if (staged) {
      // What lives on NVMe is staged already; the other parameters start from their seed.
      if (detail::needs_seed(homes[p])) {
        write_bundle(p, part.params, detail::read_seed(*store, part, compute_dtype));
      }
    } else {
      torch::Tensor initial = torch::empty({part.numel}, torch::kFloat);
      for (const detail::ParameterSlice& slice : part.slices) {
        initial.narrow(0, slice.offset, slice.numel).copy_(slice.parameter.detach().reshape({-1}));
      }
      write_bundle(p, part.params, initial.to(compute_dtype));
      if (separate_master) write_bundle(p, part.master, initial);
    }
    if (streamed(p)) {
      // The module's own tensors are freed; each visit to the device binds the copy there.
      for (const detail::ParameterSlice& slice : part.slices) {
        slice.parameter.set_data(torch::empty({0}, torch::TensorOptions().dtype(compute_dtype).device(config.device)));
      }
    } else {
      detail::bind_parameters(part, view(part.params, Tier::kGpu, compute_dtype, part.numel));
    }
  }
}

BundleId Engine::Impl::master_bundle(const Part& part) const {
  return part.master != detail::kNoBundle ? part.master : part.params;
}

torch::Tensor Engine::Impl::master_view(const Part& part) const {
  return view(master_bundle(part), optimizer_tier, torch::kFloat, part.numel);
}

BundleId Engine::Impl::gradient_bundle(const Part& part) const {
  return part.accumulator != detail::kNoBundle ? part.accumulator : part.grads;
}

torch::Tensor Engine::Impl::gradient_view(const Part& part) const {
  const BundleId id = gradient_bundle(part);
  return view(id, optimizer_tier, id == part.accumulator ? torch::kFloat : compute_dtype, part.numel);
}

bool Engine::Impl::deferred_updates() const {
  // Note: an update may only start once nothing can still cancel or rescale it. Global-norm
  // clipping needs every part's gradient norm, and a loss-scale overflow anywhere skips the
  // whole step, so with either the updates wait for the end of backward (the gradients still
  // stream down and are measured during it). The gpu mode updates in step() by definition, and a
  // delayed update starts there too, to run during the next step.
  return config.mode == Mode::kGpu || config.max_grad_norm > 0 || scaler.enabled() || delays_update();
}

bool Engine::Impl::delays_update() const {
  return config.delayed_update.enabled && steps >= config.delayed_update.warmup_steps;
}

// Note: a delayed update (ZeRO-Offload's DPU). step() of step t hands every part's update to the
// worker and returns; the worker writes the new parameters into the part's host copy (marked
// dirty) while the device runs step t+1 with the parameters of before step t. Once the part's
// last backward of step t+1 is queued, gradients_ready waits for step t's update of the part
// (the host gradients it reads are about to be overwritten anyway) and sends the new parameters
// up behind that backward on the device's stream; the next forward waits for them (enter_part),
// and step t+1's update, which starts from them on the host, waits for the copy to leave the host
// copy (update). So step t+1's gradients are computed one update behind the master they are
// applied to, and the clip coefficient and the overflow check are over step t+1's gradients as
// usual. flush() waits for the updates and sends what is pending up at once.
void Engine::Impl::upload_parameters(std::size_t index) {
  uploads[index] = store->write_back(parts[index].params, optimizer_tier, Tier::kGpu);
  stale_on_device[index] = false;
}

// Note: save() and load() flush, so a checkpoint carries no staleness: the master it holds is
// what the next step computes with, in the saving run and in a resumed one alike, and the step
// count says whether warm-up is over. Keeping the trajectory of a run that never saves would mean
// saving the stale device parameters as well, a second copy of the model (docs/engine.md).
void Engine::Impl::flush() {
  if (std::find(stale_on_device.begin(), stale_on_device.end(), true) == stale_on_device.end()) return;
  FERRY_CHECK(!pending && micro_batches == 0, "flush() in the middle of a step (", micro_batches, " of ",
              config.grad_accumulation, " micro-batches done", pending ? ", a forward waiting for its backward" : "",
              "): a delayed update is pending, and every micro-batch of a step must see the same "
              "parameters; flush (or evaluate, or save) after step()");
  wait_for_workers();
  for (std::size_t p = 0; p < parts.size(); ++p) {
    if (stale_on_device[p]) upload_parameters(p);
  }
}

// --- the CPU optimizer's staging --------------------------------------------------------------

bool Engine::Impl::staged_on_host(BundleId id) const {
  return optimizer_tier == Tier::kHost && store->spec(id).home == Tier::kNvme;
}

Fence Engine::Impl::stage(BundleId id, bool overwrite) {
  if (store->spec(id).home == optimizer_tier) return Fence();
  // A copy still going home from an earlier use is used again as it is.
  for (auto it = going_home.begin(); it != going_home.end(); ++it) {
    if (it->id != id) continue;
    it->fence.wait();
    going_home.erase(it);
    break;
  }
  if (overwrite && store->state(id, optimizer_tier) == CopyState::kAbsent) {
    store->allocate(id, optimizer_tier);
    return Fence();
  }
  return store->fetch(id, optimizer_tier);
}

Fence Engine::Impl::commit(std::size_t part, BundleId id) {
  store->mark_dirty(id, optimizer_tier);
  const Tier home = store->spec(id).home;
  if (home == optimizer_tier) return Fence();
  Fence fence = store->write_back(id, optimizer_tier, home);
  if (staged_on_host(id)) going_home.push_back({part, id, fence});
  return fence;
}

void Engine::Impl::release_staged(BundleId id) {
  if (staged_on_host(id) && store->state(id, optimizer_tier) != CopyState::kAbsent) {
    store->discard(id, optimizer_tier);
  }
}

void Engine::Impl::release_going_home(std::size_t keep_part) {
  while (!going_home.empty()) {
    const GoingHome& entry = going_home.front();
    if (entry.part <= keep_part && !entry.fence.ready()) return;
    entry.fence.wait();
    store->evict(entry.id, optimizer_tier);
    going_home.pop_front();
  }
}

void Engine::Impl::drain_going_home() {
  for (const GoingHome& entry : going_home) {
    entry.fence.wait();
    store->evict(entry.id, optimizer_tier);
  }
  going_home.clear();
}

void Engine::Impl::prefetch_optimizer_state(std::size_t index) {
  const Part& part = parts[index];
  if (part.master != detail::kNoBundle) stage(part.master, false);
  for (BundleId state : part.states) stage(state, false);
}

torch::Tensor Engine::Impl::read_bundle(BundleId id, torch::ScalarType dtype, std::int64_t numel) {
  const bool absent = store->state(id, optimizer_tier) == CopyState::kAbsent;
  store->fetch(id, optimizer_tier).wait();
  torch::Tensor values = view(id, optimizer_tier, dtype, numel).to(torch::kCPU, torch::kFloat, false, true);
  if (absent) store->evict(id, optimizer_tier);
  return values;
}

void Engine::Impl::write_bundle(std::size_t part, BundleId id, const torch::Tensor& values) {
  torch::NoGradGuard no_grad;
  stage(id, /*overwrite=*/true).wait();
  view(id, optimizer_tier, values.scalar_type(), values.numel()).copy_(values.reshape({-1}));
  commit(part, id).wait();
  drain_going_home();
}

// --- forward ----------------------------------------------------------------------------------

std::vector<std::vector<BundleId>> Engine::Impl::parameter_visits(bool reverse) const {
  const std::size_t blocks = model.num_blocks();
  std::vector<std::vector<BundleId>> visits(blocks);
  for (std::size_t k = 0; k < blocks; ++k) {
    const std::size_t p = (reverse ? blocks - 1 - k : k) + 1;
    if (streamed(p)) visits[k].push_back(parts[p].params);
  }
  return visits;
}

void Engine::Impl::enter_part(std::size_t index) { uploads[index].order_current_stream(); }

void Engine::Impl::enter_block(std::size_t block, std::size_t visit) {
  const std::size_t p = block + 1;
  window->arrive(visit);
  enter_part(p);
  if (streamed(p)) {
    detail::bind_parameters(parts[p], detail::typed_device_view(*store, parts[p].params, compute_dtype, parts[p].numel));
  }
}

void Engine::Impl::size_checkpoints(std::uint64_t bytes) {
  if (bytes <= checkpoint_bytes) return;
  // A larger micro-batch than any before: every checkpoint bundle is made again at the new size.
  for (BundleId& id : checkpoints) {
    if (id != detail::kNoBundle) store->remove(id);
    id = detail::kNoBundle;
  }
  checkpoint_bytes = bytes;
}

BundleId Engine::Impl::checkpoint_bundle(std::size_t block, std::size_t micro_batch) {
  BundleId& id = checkpoints[block * static_cast<std::size_t>(config.grad_accumulation) + micro_batch];
  if (id == detail::kNoBundle) {
    id = store->add({parts[block + 1].name + ".checkpoint." + std::to_string(micro_batch),
                     checkpoint_bytes, activations[block].tier});
  }
  return id;
}

void Engine::Impl::save_checkpoint(std::size_t block, std::size_t micro_batch, const torch::Tensor& hidden,
                                   detail::PendingBackward::SavedBlock& saved) {
  const BundleId id = checkpoint_bundle(block, micro_batch);
  const Tier home = store->spec(id).home;
  if (home != Tier::kGpu) store->allocate(id, Tier::kGpu);
  view(id, Tier::kGpu, hidden.scalar_type(), hidden.numel()).copy_(hidden.reshape({-1}));
  store->mark_dirty(id, Tier::kGpu);
  saved.checkpoint = id;
  if (home == Tier::kGpu) return;
  checkpoints_down.emplace_back(id, store->write_back(id, Tier::kGpu, home));
  release_checkpoints(2);
}

void Engine::Impl::release_checkpoints(std::size_t keep) {
  while (checkpoints_down.size() > keep ||
         (!checkpoints_down.empty() && checkpoints_down.front().second.ready())) {
    const auto [id, fence] = checkpoints_down.front();
    fence.wait();
    store->evict(id, Tier::kGpu);
    if (store->spec(id).home == Tier::kNvme) store->evict(id, Tier::kHost);
    checkpoints_down.pop_front();
  }
}

void Engine::Impl::start_step() {
  if (micro_batches > 0) return;
  step_lr = detail::scheduled_lr(config.schedule, config.optimizer.lr, steps + 1);
  step_loss_sum = torch::Tensor();
  step_tokens = 0;
}

detail::PendingBackward Engine::Impl::prepare_micro_batch(const data::Batch& batch, std::int64_t micro_batch) const {
  FERRY_CHECK(batch.input_ids.defined() && batch.input_ids.dim() == 2, "a batch needs input_ids of shape [batch, seq]");
  FERRY_CHECK(batch.labels.defined() && batch.labels.sizes() == batch.input_ids.sizes(),
              "labels must have the shape of input_ids ", batch.input_ids.sizes(), "; got ",
              batch.labels.defined() ? batch.labels.sizes() : torch::IntArrayRef{});
  detail::PendingBackward saved;
  saved.tokens = batch.input_ids.to(config.device, torch::kLong);
  saved.labels = batch.labels.to(config.device, torch::kLong);
  torch::Tensor mask = detail::device_padding_mask(batch.attention_mask, config.device);
  saved.context = model.make_context(saved.tokens, mask, batch.position_ids);
  saved.context.dropout.training = true;
  saved.context.dropout.seed = config.dropout.seed;
  saved.context.dropout.step = steps + 1;
  saved.context.dropout.micro_batch = micro_batch;
  saved.token_count = saved.tokens.numel();
  return saved;
}

void Engine::Impl::forward_blocks(std::vector<detail::PendingBackward>& micro) {
  release_checkpoints(0);
  window->begin(parameter_visits(/*reverse=*/false));
  enter_part(0);
  std::vector<torch::Tensor> hidden;
  std::uint64_t checkpoint_size = 0;
  for (detail::PendingBackward& saved : micro) {
    computed(0, true, [&] { saved.stem_output = model.stem()->forward(saved.tokens, saved.context); });
    hidden.push_back(saved.stem_output.detach());
    saved.hidden_shape = hidden.back().sizes().vec();
    checkpoint_size = std::max<std::uint64_t>(checkpoint_size, hidden.back().numel() * hidden.back().element_size());
  }
  size_checkpoints(checkpoint_size);
  for (std::size_t i = 0; i < model.num_blocks(); ++i) {
    enter_block(i, i);
    for (std::size_t m = 0; m < micro.size(); ++m) {
      detail::PendingBackward::SavedBlock block;
      if (!activations[i].recompute) {
        block.input = hidden[m].detach().requires_grad_(true);
        computed(i + 1, true, [&] { block.output = model.blocks()[i]->forward(block.input, micro[m].context); });
        hidden[m] = block.output.detach();
      } else {
        save_checkpoint(i, m, hidden[m], block);
        torch::NoGradGuard no_grad;
        computed(i + 1, true, [&] { hidden[m] = model.blocks()[i]->forward(hidden[m], micro[m].context); });
      }
      micro[m].blocks.push_back(std::move(block));
    }
    window->depart(i, {});
  }
  window->finish();
  for (std::size_t m = 0; m < micro.size(); ++m) micro[m].head_input = hidden[m].detach().requires_grad_(true);
}

void Engine::Impl::forward_head(detail::PendingBackward& saved) {
  enter_part(parts.size() - 1);
  computed(parts.size() - 1, true, [&] {
    saved.loss = model.loss(model.head()->forward(saved.head_input, saved.context), saved.labels);
  });
}

torch::Tensor Engine::Impl::forward(const data::Batch& batch) {
  FERRY_CHECK(!pending, "forward() was called twice without backward() in between");
  check_batch_major("forward()");
  FERRY_CHECK(micro_batches < config.grad_accumulation, "forward() after ", micro_batches,
              " micro-batches: call step() every grad_accumulation = ", config.grad_accumulation,
              " micro-batches");
  auto start = Clock::now();
  std::vector<detail::PendingBackward> micro;
  micro.push_back(prepare_micro_batch(batch, micro_batches));
  start_step();
  forward_blocks(micro);
  forward_head(micro.front());
  pending = std::move(micro.front());
  stats.forward_seconds += seconds_since(start);
  return pending->loss;
}

void Engine::Impl::check_batch_major(const char* call) const {
  FERRY_CHECK(config.micro_batch_order == MicroBatchOrder::kBatchMajor, call,
              " is not available with micro_batch_order layer-major: a step's micro-batches pass "
              "through each block together; call train_step(batch) for each micro-batch");
}

// --- backward ---------------------------------------------------------------------------------

// Note: autograd owns the parameters' .grad and hands over its own buffers; once a part's
// backward is done they are copied into the part's flat gradient bundle (4 bytes a bf16 parameter)
// and dropped. A .grad bound to views of the bundle would instead make autograd add into it and
// the step zero it: 8 bytes, and twice the kernels (docs/engine.md, "One step, every mode").
void Engine::Impl::collect_gradients(std::size_t index) {
  torch::NoGradGuard no_grad;
  const Part& part = parts[index];
  torch::Tensor grads = view(part.grads, Tier::kGpu, compute_dtype, part.numel);
  for (const detail::ParameterSlice& slice : part.slices) {
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

void Engine::Impl::release_gradients(std::size_t keep) {
  while (gradients_on_device.size() > keep ||
         (!gradients_on_device.empty() && gradients_down[gradients_on_device.front().first].ready())) {
    const auto [index, id] = gradients_on_device.front();
    gradients_down[index].wait();
    // Scratch once down: the optimizer may already have consumed and dropped the host copy.
    store->discard(id, Tier::kGpu);
    gradients_on_device.pop_front();
  }
}

void Engine::Impl::prepare_gradients(std::size_t index) {
  if (!offloaded()) return;
  // A fresh device copy for this micro-batch's gradients of the part (collect_gradients fills
  // it), once at most two earlier parts' are still going down (the stem's, kept for a tied
  // head, aside).
  release_gradients(2);
  // The worker may still be reading the part's host gradients: adding up the previous
  // micro-batch's, or, with a delayed update, updating with the previous step's.
  wait_for_part(index);
  store->allocate(parts[index].grads, Tier::kGpu);
}

void Engine::Impl::limit_gradients_ahead() {
  if (!staged_on_host(parts.front().grads)) return;  // they wait at home
  while (gradients_waiting.size() > detail::kGradientsAhead) {
    part_work[gradients_waiting.front()].wait();
    gradients_waiting.pop_front();
  }
}

void Engine::Impl::begin_backward() {
  release_gradients(0);  // the previous micro-batch's device gradients are all down
  release_checkpoints(0);  // the window brings them back
  if (updates_now() && offloaded()) {
    worker.submit([this] { prefetch_optimizer_state(parts.size() - 1); });
  }
  // The stem's gradients collect from the head too when the embedding is tied.
  prepare_gradients(0);
  prepare_gradients(parts.size() - 1);
}

bool Engine::Impl::updates_now() const {
  return micro_batches + 1 >= config.grad_accumulation && !deferred_updates();
}

void Engine::Impl::backward_head(detail::PendingBackward& saved) {
  torch::Tensor scaled = saved.loss * (scaler.scale() / static_cast<double>(config.grad_accumulation));
  computed(parts.size() - 1, false, [&] { torch::autograd::backward({scaled}); });
  saved.gradient = saved.head_input.grad();
  // Summed on the device and read once in step(): a read here would stall the host until the
  // device caught up, and it could no longer queue work ahead.
  torch::Tensor loss_value = saved.loss.detach().to(torch::kDouble);
  step_loss_sum = step_loss_sum.defined() ? step_loss_sum + loss_value : loss_value;
  step_tokens += saved.token_count;
}

void Engine::Impl::backward_blocks(std::vector<detail::PendingBackward>& micro, bool summed) {
  const std::size_t blocks = model.num_blocks();
  // Each block's visit brings its parameters and its checkpoints back to the device. When the
  // update follows at once, the CPU optimizer writes the new parameters into their host staging.
  std::vector<std::vector<BundleId>> visits = parameter_visits(/*reverse=*/true);
  std::vector<BundleId> keep_staging;
  for (std::size_t k = 0; k < blocks; ++k) {
    const std::size_t i = blocks - 1 - k;
    for (const detail::PendingBackward& saved : micro) {
      const BundleId checkpoint = saved.blocks[i].checkpoint;
      if (checkpoint != detail::kNoBundle && store->spec(checkpoint).home != Tier::kGpu) {
        visits[k].push_back(checkpoint);
      }
    }
    if (updates_now() && staged_on_host(parts[i + 1].params)) keep_staging.push_back(parts[i + 1].params);
  }
  window->begin(std::move(visits), std::move(keep_staging));
  for (std::size_t k = 0; k < blocks; ++k) {
    const std::size_t i = blocks - 1 - k;
    prepare_gradients(i + 1);
    enter_block(i, k);
    for (std::size_t m = 0; m < micro.size(); ++m) {
      detail::PendingBackward& saved = micro[m];
      detail::PendingBackward::SavedBlock& block = saved.blocks[i];
      computed(i + 1, false, [&] {
        if (!block.output.defined()) {
          torch::Tensor input = block.input;
          if (block.checkpoint != detail::kNoBundle) {
            const std::int64_t numel = c10::multiply_integers(saved.hidden_shape);
            input = detail::typed_device_view(*store, block.checkpoint, saved.stem_output.scalar_type(), numel)
                        .view(saved.hidden_shape);
          }
          block.input = input.to(config.device, /*non_blocking=*/true).detach().requires_grad_(true);
          block.output = model.blocks()[i]->forward(block.input, saved.context);
        }
        torch::autograd::backward({block.output}, {saved.gradient});
      });
      saved.gradient = block.input.grad();
      block = {};
      if (summed) fold_gradients(i + 1, m == 0);
    }
    // Its uploads are done before the optimizer writes into their host staging.
    window->settle(k);
    window->depart(k, {});
    gradients_ready(i + 1, summed);
  }
  window->finish();
}

void Engine::Impl::backward_stem(std::vector<detail::PendingBackward>& micro, bool summed) {
  for (detail::PendingBackward& saved : micro) {
    computed(0, false, [&] { torch::autograd::backward({saved.stem_output}, {saved.gradient}); });
    if (summed) fold_gradients(0, false);  // the head's backward began the stem's sum
  }
  gradients_ready(0, summed);
}

void Engine::Impl::backward(const torch::Tensor& loss) {
  FERRY_CHECK(pending, "backward() needs a forward() first");
  FERRY_CHECK(loss.is_same(pending->loss), "backward() takes the loss that forward() returned");
  auto start = Clock::now();
  std::vector<detail::PendingBackward> micro;
  micro.push_back(std::move(*pending));
  pending.reset();
  begin_backward();
  backward_head(micro.front());
  gradients_ready(parts.size() - 1, false);
  backward_blocks(micro, false);
  backward_stem(micro, false);
  ++micro_batches;
  stats.backward_seconds += seconds_since(start);
}

// Note: GreedySnake's layer-major order (arXiv 2512.17570). All of a step's micro-batches pass
// through a block before the next block comes: forward keeps every micro-batch's checkpoint of
// the block, the head runs forward and backward per micro-batch at once (its logits are the
// largest activation), and backward runs every micro-batch through a block while its parameters
// are on the device. Each part's gradients are summed on the device in fp32 (its accumulator's
// device copy: fold_gradients) and go down once, so per step the parameters, gradients and
// optimizer states cross NVMe and PCIe once instead of once per micro-batch.
StepResult Engine::Impl::train_layer_major(const std::vector<data::Batch>& batches) {
  auto start = Clock::now();
  std::vector<detail::PendingBackward> micro;
  for (const data::Batch& batch : batches) {
    micro.push_back(prepare_micro_batch(batch, static_cast<std::int64_t>(micro.size())));
  }
  start_step();
  forward_blocks(micro);
  stats.forward_seconds += seconds_since(start);
  start = Clock::now();
  micro_batches = config.grad_accumulation - 1;  // what follows is the step's last backward
  begin_backward();
  for (std::size_t m = 0; m < micro.size(); ++m) {
    forward_head(micro[m]);
    backward_head(micro[m]);
    fold_gradients(parts.size() - 1, m == 0);
    fold_gradients(0, m == 0);
  }
  gradients_ready(parts.size() - 1, true);
  backward_blocks(micro, true);
  backward_stem(micro, true);
  micro_batches = config.grad_accumulation;
  stats.backward_seconds += seconds_since(start);
  return step();
}

void Engine::Impl::fold_gradients(std::size_t index, bool first) {
  collect_gradients(index);
  torch::NoGradGuard no_grad;
  const Part& part = parts[index];
  if (store->state(part.accumulator, Tier::kGpu) == CopyState::kAbsent) store->allocate(part.accumulator, Tier::kGpu);
  torch::Tensor sum = view(part.accumulator, Tier::kGpu, torch::kFloat, part.numel);
  torch::Tensor grads = view(part.grads, Tier::kGpu, compute_dtype, part.numel);
  if (first) {
    sum.copy_(grads);
  } else {
    sum.add_(grads);
  }
}

void Engine::Impl::gradients_ready(std::size_t index, bool summed) {
  const bool first = micro_batches == 0;
  const bool last = micro_batches + 1 == config.grad_accumulation;
  const Part& part = parts[index];
  if (!summed) collect_gradients(index);
  if (!offloaded()) {
    accumulate_and_measure(index, first, last, summed);
    return;
  }
  // What goes down: this micro-batch's gradients, or the step's fp32 sum of them.
  const BundleId down = summed ? part.accumulator : part.grads;
  limit_gradients_ahead();
  wait_for_part(index);  // done with the host copy the gradients go down into
  store->mark_dirty(down, Tier::kGpu);  // autograd (or fold_gradients) wrote the device copy
  // Measured on the device as they go down: the worker then reads two numbers, not the gradients.
  if (last && (first || summed) && config.device.is_cuda()) {
    device_stats[index] = detail::measure_on_device(view(down, Tier::kGpu, summed ? torch::kFloat : compute_dtype,
                                                         part.numel));
  }
  gradients_down[index] = store->write_back(down, Tier::kGpu, Tier::kHost);
  // The step's last use of the part's parameters is queued: the delayed update may go up.
  if (last && stale_on_device[index]) upload_parameters(index);
  gradients_on_device.push_back({index, down});
  if (summed) store->discard(part.grads, Tier::kGpu);  // scratch once folded
  const bool update_now = last && !deferred_updates();
  const std::int64_t step = steps + 1;
  const double lr = step_lr;
  const auto sent = detail::Tracer::Clock::now();
  part_work[index] = worker.submit([this, index, first, last, summed, update_now, step, lr, sent] {
    gradients_down[index].wait();
    tracer->record(parts[index].name + " gradients", detail::Track::kGradientsDown, sent,
                  detail::Tracer::Clock::now());
    traced("update " + parts[index].name, detail::Track::kOptimizer, [&] {
      accumulate_and_measure(index, first, last, summed);
      const Part& part = parts[index];
      const BundleId gradient = gradient_bundle(part);
      if (!update_now) {
        // Kept at home until the next micro-batch adds to them or step() updates with them.
        if (staged_on_host(gradient)) commit(index, gradient);
        return;
      }
      part_updated[index] = true;
      if (part_stats[index].finite) {
        update(index, {step, lr, 1.0, 1.0, true}, true);
      } else {
        release_staged(gradient);  // without loss scaling a non-finite part is left as is
      }
    });
  });
  gradients_waiting.push_back(index);
}

void Engine::Impl::accumulate_and_measure(std::size_t index, bool first_micro_batch,
                                          bool last_micro_batch, bool summed_on_device) {
  const Part& part = parts[index];
  if (part.accumulator != detail::kNoBundle && !summed_on_device) {
    torch::NoGradGuard no_grad;
    stage(part.accumulator, /*overwrite=*/first_micro_batch).wait();
    torch::Tensor sum = view(part.accumulator, optimizer_tier, torch::kFloat, part.numel);
    torch::Tensor grads = view(part.grads, optimizer_tier, compute_dtype, part.numel);
    if (first_micro_batch) {
      sum.copy_(grads);
    } else {
      sum.add_(grads);
    }
    if (offloaded()) release_staged(part.grads);
  }
  if (!last_micro_batch) return;
  if (offloaded() && device_stats[index].defined()) {
    // Note: measured on the stream before the gradients' copy down, which the worker has awaited.
    part_stats[index] = detail::measured_stats(device_stats[index]);
    device_stats[index] = torch::Tensor();
    return;
  }
  torch::Tensor grad = gradient_view(part);
  if (grad.device().is_cpu()) {
    part_stats[index] = detail::gradient_stats(grad);
  } else {
    device_stats[index] = detail::measure_on_device(grad);  // read in step()
  }
}

bool Engine::Impl::update(std::size_t index, const detail::UpdateContext& context, bool upload) {
  auto start = Clock::now();
  const Part& part = parts[index];
  release_going_home(index + 1);
  // The last upload still reads the host copy of the parameters (with a delayed update it left
  // during this step's backward): staging may not fetch into it, nor the update overwrite it.
  if (offloaded()) uploads[index].wait();
  const BundleId master = master_bundle(part);
  const BundleId gradient = gradient_bundle(part);
  std::vector<Fence> staged{stage(master, false), stage(gradient, false)};
  for (BundleId state : part.states) staged.push_back(stage(state, false));
  if (part.master != detail::kNoBundle) staged.push_back(stage(part.params, /*overwrite=*/true));
  if (index > 0) prefetch_optimizer_state(index - 1);
  for (const Fence& fence : staged) fence.wait();

  detail::PartUpdate update;
  update.master = master_view(part);
  for (BundleId state : part.states) {
    update.states.push_back(view(state, optimizer_tier, torch::kFloat, part.numel));
  }
  update.grad = gradient_view(part);
  if (part.master != detail::kNoBundle) {
    update.output = view(part.params, optimizer_tier, compute_dtype, part.numel);
  }
  update.decay_numel = part.decay_numel;
  const bool skipped = detail::apply_update(config.optimizer, context, update);
  release_staged(gradient);
  if (skipped) {
    release_staged(master);
    for (BundleId state : part.states) release_staged(state);
    release_staged(part.params);
  } else {
    for (BundleId state : part.states) commit(index, state);
    if (part.master != detail::kNoBundle) commit(index, part.master);
    if (upload) {
      Fence params = commit(index, part.params);
      if (homes[index].params == Tier::kGpu) uploads[index] = params;
    } else {
      store->mark_dirty(part.params, optimizer_tier);  // upload_parameters sends it up
    }
  }
  std::lock_guard<std::mutex> lock(stats_mutex);
  stats.optimizer_seconds += seconds_since(start);
  return skipped;
}

void Engine::Impl::read_device_stats() {
  const bool pending = std::any_of(device_stats.begin(), device_stats.end(),
                                   [](const torch::Tensor& measured) { return measured.defined(); });
  if (!pending) return;
  detail::wait_for_current_stream(config.device);
  for (std::size_t i = 0; i < device_stats.size(); ++i) {
    if (!device_stats[i].defined()) continue;
    part_stats[i] = detail::measured_stats(device_stats[i]);
    device_stats[i] = torch::Tensor();
  }
}

void Engine::Impl::wait_for_part(std::size_t index) {
  if (!part_work[index].valid()) return;
  auto start = Clock::now();
  part_work[index].wait();
  stats.optimizer_wait_seconds += seconds_since(start);
}

void Engine::Impl::wait_for_workers() {
  auto start = Clock::now();
  for (auto& work : part_work) {
    if (work.valid()) work.get();
  }
  gradients_waiting.clear();
  drain_going_home();  // the worker is idle: what it staged leaves the host
  stats.optimizer_wait_seconds += seconds_since(start);
}

// --- step -------------------------------------------------------------------------------------

std::optional<StepResult> Engine::Impl::train_step(const data::Batch& batch) {
  if (config.micro_batch_order == MicroBatchOrder::kLayerMajor) {
    buffered.push_back(batch);
    if (static_cast<std::int64_t>(buffered.size()) < config.grad_accumulation) return std::nullopt;
    std::vector<data::Batch> batches = std::move(buffered);
    buffered.clear();
    return train_layer_major(batches);
  }
  backward(forward(batch));
  if (micro_batches < config.grad_accumulation) return std::nullopt;
  return step();
}

StepResult Engine::Impl::step() {
  FERRY_CHECK(!pending, "step() between forward() and backward(): call backward() first");
  FERRY_CHECK(micro_batches == config.grad_accumulation, "step() after ", micro_batches,
              " micro-batches; grad_accumulation is ", config.grad_accumulation);
  wait_for_workers();
  release_gradients(0);
  read_device_stats();

  StepResult result;
  result.loss = step_loss_sum.item<double>() / static_cast<double>(micro_batches);
  result.lr = step_lr;
  result.loss_scale = scaler.scale();
  result.tokens = step_tokens;
  double sum_squares = 0;
  bool finite = true;
  for (const optim::GradStats& part : part_stats) {
    sum_squares += part.sum_squares;
    finite = finite && part.finite;
  }
  const double grad_norm = std::sqrt(sum_squares) / scaler.scale();
  result.grad_norm = finite ? grad_norm : std::numeric_limits<double>::quiet_NaN();
  result.skipped = scaler.enabled() && !finite;

  const bool delayed = delays_update();
  if (!result.skipped) {
    double clip_coef = 1.0;
    if (config.max_grad_norm > 0 && finite) {
      clip_coef = std::min(1.0, config.max_grad_norm / (grad_norm + 1e-6));
    }
    const detail::UpdateContext context{steps + 1, step_lr, scaler.scale(), clip_coef, true};
    // In backward order, as the offload modes stage them.
    for (std::size_t i = parts.size(); i-- > 0;) {
      if (part_updated[i]) continue;
      if (!part_stats[i].finite) continue;  // without loss scaling a non-finite part is left as is
      auto run = [this, i, context, delayed] {
        traced("update " + parts[i].name, detail::Track::kOptimizer, [&] { update(i, context, !delayed); });
      };
      if (offloaded()) {
        part_work[i] = worker.submit(run);
      } else {
        run();
      }
      stale_on_device[i] = delayed;
    }
    if (!delayed) wait_for_workers();
  }
  scaler.update(!finite);
  part_updated.assign(parts.size(), false);
  micro_batches = 0;
  result.step = ++steps;
  stats.steps = steps;
  return result;
}

torch::Tensor Engine::Impl::run_inference(const torch::Tensor& tokens, const torch::Tensor& padding_mask,
                                          const torch::Tensor& position_ids) {
  FERRY_CHECK(!pending, "inference between forward() and backward(): call backward() first");
  flush();
  torch::NoGradGuard no_grad;
  torch::Tensor input = tokens.to(config.device, torch::kLong);
  torch::Tensor mask = detail::device_padding_mask(padding_mask, config.device);
  StepContext context = model.make_context(input, mask, position_ids);
  window->begin(parameter_visits(/*reverse=*/false));
  enter_part(0);
  torch::Tensor hidden = model.stem()->forward(input, context);
  for (std::size_t i = 0; i < model.num_blocks(); ++i) {
    enter_block(i, i);
    hidden = model.blocks()[i]->forward(hidden, context);
    window->depart(i, {});
  }
  window->finish();
  enter_part(parts.size() - 1);
  return model.head()->forward(hidden, context);
}

// --- Engine -----------------------------------------------------------------------------------

Engine::Engine(LayeredModel model, EngineConfig config) {
  if (config.dropout.rate) model.set_dropout(*config.dropout.rate);
  if (config.mode == Mode::kZo2) {
    zo2_ = std::make_unique<Zo2>(std::move(model), std::move(config));
  } else {
    impl_ = std::make_unique<Impl>(std::move(model), std::move(config));
  }
}

Engine::~Engine() = default;

namespace {
void check_first_order(bool zo2, const char* call) {
  FERRY_CHECK(!zo2, call, " is not available in zo2 mode: it has no backward pass; train with "
              "train_step(batch), which runs both perturbed forwards and the update");
}
}  // namespace

torch::Tensor Engine::forward(const data::Batch& batch) {
  check_first_order(zo2_ != nullptr, "forward()");
  return impl_->forward(batch);
}

void Engine::backward(const torch::Tensor& loss) {
  check_first_order(zo2_ != nullptr, "backward()");
  impl_->backward(loss);
}

StepResult Engine::step() {
  check_first_order(zo2_ != nullptr, "step()");
  impl_->check_batch_major("step()");
  return impl_->step();
}

std::optional<StepResult> Engine::train_step(const data::Batch& batch) {
  if (zo2_) return zo2_->train_step(batch);
  return impl_->train_step(batch);
}

void Engine::flush() {
  if (zo2_) {
    zo2_->flush();
  } else {
    impl_->flush();
  }
}

double Engine::evaluate(const data::Batch& batch) {
  torch::Tensor logits = impl_ ? impl_->run_inference(batch.input_ids, batch.attention_mask, batch.position_ids)
                               : zo2_->logits(batch.input_ids, batch.attention_mask, batch.position_ids);
  torch::NoGradGuard no_grad;
  return model().loss(logits, batch.labels.to(config().device, torch::kLong)).item<double>();
}

torch::Tensor Engine::logits(const torch::Tensor& tokens) {
  return impl_ ? impl_->run_inference(tokens, torch::Tensor()) : zo2_->logits(tokens, torch::Tensor());
}

std::vector<std::int64_t> Engine::generate(const std::vector<std::int64_t>& prompt,
                                           std::int64_t max_new_tokens,
                                           std::optional<std::int64_t> stop_token) {
  FERRY_CHECK(!prompt.empty(), "generate() needs a prompt of at least one token");
  std::vector<std::int64_t> sequence = prompt;
  std::vector<std::int64_t> generated;
  for (std::int64_t i = 0; i < max_new_tokens; ++i) {
    torch::Tensor tokens = torch::tensor(sequence, torch::kLong).unsqueeze(0);
    torch::Tensor next_logits = logits(tokens);
    std::int64_t next = next_logits.select(1, next_logits.size(1) - 1).argmax(-1).item<std::int64_t>();
    if (stop_token && next == *stop_token) break;
    generated.push_back(next);
    sequence.push_back(next);
  }
  return generated;
}

std::string Engine::write_trace(const std::string& path) const {
  const detail::Tracer& tracer = impl_ ? *impl_->tracer : *zo2_->tracer;
  FERRY_CHECK(tracer.enabled(), "write_trace() needs EngineConfig::trace = true");
  tracer.write(path);
  return tracer.overlap_summary();
}

const LayeredModel& Engine::model() const { return impl_ ? impl_->model : zo2_->model; }
const EngineConfig& Engine::config() const { return impl_ ? impl_->config : zo2_->config; }
std::int64_t Engine::steps_taken() const { return impl_ ? impl_->steps : zo2_->steps; }

double Engine::current_lr() const {
  return detail::scheduled_lr(config().schedule, config().optimizer.lr, steps_taken() + 1);
}

EngineStats Engine::stats() const {
  if (zo2_) {
    EngineStats stats = zo2_->stats;
    stats.store = zo2_->store->stats();
    return stats;
  }
  EngineStats stats;
  {
    std::lock_guard<std::mutex> lock(impl_->stats_mutex);
    stats = impl_->stats;
  }
  stats.store = impl_->store->stats();
  return stats;
}

}  // namespace ferry
