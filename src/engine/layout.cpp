#include "engine/layout.h"

#include <algorithm>
#include <functional>

#include "engine/data_parallel.h"
#include "engine/sizing.h"
#include "engine/update.h"
#include "ferry/check.h"

namespace ferry::detail {
namespace {

std::uint64_t stored(std::uint64_t bytes) { return (bytes + kIoAlignment - 1) / kIoAlignment * kIoAlignment; }

// The most bytes one part's bundle of a role takes among the parts that `counts`.
template <typename Counts>
std::uint64_t largest(const std::vector<Part>& parts, std::size_t from, std::uint64_t per_parameter, Counts counts) {
  std::uint64_t most = 0;
  for (std::size_t p = from; p < parts.size(); ++p) {
    if (counts(p)) most = std::max(most, stored(static_cast<std::uint64_t>(parts[p].numel) * per_parameter));
  }
  return most;
}

PoolId reserve(Store& store, Tier tier, std::uint64_t bytes, const char* name, TierDemand* demand) {
  if (bytes == 0) return kNoPool;
  record(demand, tier, name, bytes);
  return store.reserve(tier, bytes, name);
}

}  // namespace

std::size_t window_capacity(const EngineConfig& config, const Placement& placement) {
  const bool streams = std::any_of(placement.parts.begin(), placement.parts.end(),
                                   [](const PartPlacement& home) { return home.streamed(); });
  return streams ? static_cast<std::size_t>(config.fuyou.blocks_in_flight) : 2;
}

std::vector<Part> parts_of(const std::vector<PartShape>& shapes) {
  std::vector<Part> parts(shapes.size());
  for (std::size_t p = 0; p < shapes.size(); ++p) {
    parts[p].name = shapes[p].name;
    parts[p].numel = shapes[p].numel;
    parts[p].frozen_numel = shapes[p].frozen_numel;
    parts[p].frozen_channels = shapes[p].frozen_channels;
    parts[p].kind = p == 0 ? models::Part::kStem : p + 1 == shapes.size() ? models::Part::kHead : models::Part::kBlock;
    if (parts[p].kind == models::Part::kBlock) parts[p].index = static_cast<std::int64_t>(p) - 1;
  }
  return parts;
}

std::uint64_t visit_bytes(const Part& part, const EngineConfig& config) {
  const std::uint64_t e = torch::elementSize(scalar_type(config.precision));
  return stored(static_cast<std::uint64_t>(part.numel) * e) + frozen_visit_bytes(part, config);
}

std::uint64_t frozen_visit_bytes(const Part& part, const EngineConfig& config) {
  return stored(part.frozen_numel > 0 ? frozen_bytes(part, config) : 0);
}

void record(TierDemand* demand, Tier tier, const char* role, std::uint64_t bytes) {
  if (demand == nullptr || bytes == 0) return;
  const int t = static_cast<int>(tier);
  demand->bytes[t] += bytes;
  for (TierDemand::Item& item : demand->items[t]) {
    if (item.role != role) continue;
    item.bytes += bytes;
    return;
  }
  demand->items[t].push_back({role, bytes});
}

// Note: what each pool holds at most, from the bounds the step keeps (first_order.cpp):
// - window: the visits the device window holds, each with a streamed block's parameters;
// - device gradients: the stem's (kept through backward), the part in backward, the
//   kReductionsInFlight before it being reduced across the ranks (several ranks only) and the
//   kGradientsGoingDown before those still on their way down; their fp32 sums likewise,
//   layer-major;
// - parameter staging: every resident part the CPU updates keeps a host copy it writes into;
// - NVMe staging: streamed blocks' parameters passing through (the window's, with their frozen
//   ones, and those kept for an update the worker has not reached: kGradientsAhead + 1, which
//   never includes frozen ones), gradients (or their sums) waiting
//   for the worker (kGradientsAhead + 1), and the optimizer state of kPartsStaged parts.
StepPools lay_out_parts(Store& store, std::vector<Part>& parts, const Placement& placement,
                        const EngineConfig& config, const Ranks& ranks, const AddBundle& add, TierDemand* demand) {
  const std::uint64_t e = torch::elementSize(scalar_type(config.precision));
  const auto& homes = placement.parts;
  auto cpu = [&](std::size_t p) { return !homes[p].updated_on_gpu(); };
  auto on_nvme = [&](Tier tier) { return tier == Tier::kNvme; };
  const std::size_t window = window_capacity(config, placement);
  const bool layer_major = config.micro_batch_order == MicroBatchOrder::kLayerMajor;
  const PlacementRoles roles = placement_roles(config);
  for (Part& part : parts) part.shard = shard_of(ranks, part.numel);

  // A visit brings a part's parameters and its frozen ones; only the former wait for an update.
  auto largest_visit = [&](auto counts) {
    std::uint64_t most = 0;
    for (std::size_t p = 0; p < parts.size(); ++p) {
      if (counts(p)) most = std::max(most, visit_bytes(parts[p], config));
    }
    return most;
  };
  const std::uint64_t streamed = largest_visit([&](std::size_t p) { return homes[p].streamed(); });
  const std::uint64_t stem_grads = cpu(0) ? stored(static_cast<std::uint64_t>(parts[0].numel) * e) : 0;
  const std::uint64_t stem_sum = cpu(0) ? stored(static_cast<std::uint64_t>(parts[0].numel) * 4) : 0;
  const std::uint64_t sent = largest(parts, 1, e, cpu);
  const std::uint64_t summed = largest(parts, 1, 4, cpu);
  std::uint64_t resident_staging = 0;
  for (std::size_t p = 0; p < parts.size(); ++p) {
    if (cpu(p) && homes[p].params == Tier::kGpu) resident_staging += stored(static_cast<std::uint64_t>(parts[p].numel) * e);
  }
  const std::uint64_t nvme_params = largest(parts, 0, e, [&](std::size_t p) { return on_nvme(homes[p].params); });
  const std::uint64_t nvme_visit = largest_visit([&](std::size_t p) { return on_nvme(homes[p].params); });
  const std::uint64_t nvme_gradients = std::max(
      largest(parts, 0, e, [&](std::size_t p) { return cpu(p) && on_nvme(homes[p].grads); }),
      layer_major && roles.accumulator
          ? largest(parts, 0, 4, [&](std::size_t p) { return cpu(p) && on_nvme(homes[p].accumulator); })
          : 0);
  std::uint64_t nvme_work = 0;  // one CPU-updated part's bundles at home on NVMe that its update stages
  for (std::size_t p = 0; p < parts.size(); ++p) {
    if (!cpu(p)) continue;
    const auto numel = static_cast<std::uint64_t>(parts[p].numel);
    std::uint64_t work = on_nvme(homes[p].params) ? stored(numel * e) : 0;
    const auto shard = static_cast<std::uint64_t>(parts[p].shard.numel);
    if (roles.master && on_nvme(homes[p].master)) work += stored(shard * 4);
    for (int i = 0; i < roles.states; ++i) work += on_nvme(homes[p].states[i]) ? stored(shard * 4) : 0;
    if (roles.accumulator && on_nvme(homes[p].accumulator)) work += stored(numel * 4);
    nvme_work = std::max(nvme_work, work);
  }
  const bool sends = std::any_of(homes.begin(), homes.end(), [](const PartPlacement& h) { return !h.updated_on_gpu(); });

  const std::size_t reducing = ranks.world_size > 1 ? kReductionsInFlight : 0;
  const std::size_t sending = kGradientsGoingDown + reducing + 1;
  StepPools pools;
  pools.window = reserve(store, Tier::kGpu, window * streamed, "blocks in flight", demand);
  if (sends) {
    pools.device_gradients = reserve(store, Tier::kGpu, stem_grads + sending * sent,
                                     "gradients on their way down", demand);
    if (layer_major) {
      pools.device_sums = reserve(store, Tier::kGpu, stem_sum + sending * summed,
                                  "fp32 gradient sums on their way down", demand);
    }
  }
  pools.parameter_staging = reserve(store, Tier::kHost, resident_staging, "parameter staging", demand);
  pools.nvme_staging = reserve(store, Tier::kHost,
                               window * nvme_visit + (kGradientsAhead + 1) * (nvme_params + nvme_gradients) +
                                   kPartsStaged * nvme_work,
                               "NVMe staging", demand);
  for (std::size_t p = 0; p < parts.size(); ++p) {
    add_bundles(parts[p], homes[p], config, pools, [&](const BundleSpec& spec, const char* role) {
      record(demand, spec.home, role, stored(spec.bytes));
      return add(spec, role);
    });
  }
  return pools;
}

// Note: in forward a swapped checkpoint goes down while the next ones are saved, at most
// kCheckpointsGoingDown behind; in backward the window brings each visit's checkpoints back, all
// of a step's micro-batches' in layer-major order.
void lay_out_checkpoints(Store& store, const std::vector<Part>& parts, const Placement& placement,
                         const EngineConfig& config, std::uint64_t bytes, CheckpointLayout& layout,
                         TierDemand* demand) {
  for (BundleId id : layout.bundles) {
    if (id != kNoBundle) store.remove(id);
  }
  for (PoolId pool : {layout.device, layout.staging}) {
    if (pool != kNoPool) store.release(pool);
  }
  layout = CheckpointLayout{};
  layout.bytes = bytes;
  const std::size_t blocks = parts.size() - 2;
  const auto micro_batches = static_cast<std::size_t>(config.grad_accumulation);
  const std::size_t per_visit = config.micro_batch_order == MicroBatchOrder::kLayerMajor ? micro_batches : 1;
  const std::uint64_t in_flight =
      std::max(kCheckpointsGoingDown + 1, window_capacity(config, placement) * per_visit) * stored(bytes);
  bool swapped = false, through_host = false;
  for (const BlockActivations& block : placement.activations) {
    swapped |= block.recompute && block.tier != Tier::kGpu;
    through_host |= block.recompute && block.tier == Tier::kNvme;
  }
  layout.device = reserve(store, Tier::kGpu, swapped ? in_flight : 0, "checkpoints on the device", demand);
  layout.staging = reserve(store, Tier::kHost, through_host ? in_flight : 0, "checkpoint staging", demand);
  layout.bundles.assign(blocks * micro_batches, kNoBundle);
  for (std::size_t i = 0; i < blocks; ++i) {
    const BlockActivations& block = placement.activations[i];
    if (!block.recompute) continue;
    for (std::size_t m = 0; m < micro_batches; ++m) {
      BundleSpec spec{parts[i + 1].name + ".checkpoint." + std::to_string(m), bytes, block.tier};
      spec.pools[static_cast<int>(Tier::kGpu)] = layout.device;
      spec.pools[static_cast<int>(Tier::kHost)] = block.tier == Tier::kNvme ? layout.staging : kNoPool;
      record(demand, block.tier, "activation checkpoints", stored(bytes));
      layout.bundles[i * micro_batches + m] = store.add(spec);
    }
  }
}

namespace {

// Runs `lay_out` against a counting store without budgets and returns what it recorded.
TierDemand count(const EngineConfig& config, const std::function<void(Store&, TierDemand*)>& lay_out) {
  StoreOptions options = store_options(config);
  options.count_only = true;
  options.gpu_budget_bytes = options.host_budget_bytes = options.nvme_budget_bytes = UINT64_MAX;
  Store store(options);
  TierDemand demand;
  lay_out(store, &demand);
  const StoreStats counted = store.stats();
  for (Tier tier : {Tier::kGpu, Tier::kHost, Tier::kNvme}) {
    FERRY_ASSERT(counted.tiers[static_cast<int>(tier)].used_bytes == demand.bytes[static_cast<int>(tier)],
                 "the counted set-up and its record disagree on the ", to_string(tier), " tier");
  }
  return demand;
}

}  // namespace

TierDemand count_first_order(const std::vector<PartShape>& shapes, const EngineConfig& config,
                             std::uint64_t checkpoint_bytes, const Ranks& ranks) {
  const Placement placement = resolve_placement(config, shapes.size());
  return count(config, [&](Store& store, TierDemand* demand) {
    std::vector<Part> parts = parts_of(shapes);
    lay_out_parts(store, parts, placement, config, ranks,
                  [&](const BundleSpec& spec, const char*) { return store.add(spec); }, demand);
    if (checkpoint_bytes > 0) {
      CheckpointLayout checkpoints;
      lay_out_checkpoints(store, parts, placement, config, checkpoint_bytes, checkpoints, demand);
    }
  });
}

// Note: what each zo2 pool holds at most, from the bounds its sweep keeps (zo2.cpp):
// - window: the device window's visits (zo.blocks_in_flight, or fewer when fewer blocks stream),
//   each one streamed block's stored weights, states and frozen parameters, or a compressed
//   block's transfer copy alone;
// - NVMe staging: the host copies of the visits' bundles at home on NVMe, which the window drops
//   with their device copies; between sweeps, one bundle written or read at home (write_home,
//   read_home, the frozen parameters at set-up).
// Everything else is at home: stem and head (weights, states, compute copies) and the resident
// blocks on the device, the compute slots every block computes from, the other blocks on their
// home tier and the compressed blocks' transfer copies in host memory.
ZoLayout lay_out_zo(Store& store, std::vector<Part>& parts, const EngineConfig& config, TierDemand* demand) {
  const std::uint64_t compute_size = torch::elementSize(scalar_type(config.precision));
  const std::uint64_t storage_size = torch::elementSize(scalar_type(zo_storage(config)));
  const int state_count = optimizer_state_count(config.optimizer);
  const auto blocks = static_cast<std::int64_t>(parts.size()) - 2;
  auto weights_bytes = [&](const Part& part) { return static_cast<std::uint64_t>(part.numel) * storage_size; };
  auto state_bytes = [&](const Part& part) { return static_cast<std::uint64_t>(part.numel) * 4; };
  auto transfer_bytes = [&](const Part& part) { return zo_transfer_bytes(config.zo.transfer, part.numel); };
  ZoLayout layout;
  layout.parts.resize(parts.size());
  std::int64_t largest_block = 0;
  std::uint64_t visit = 0, nvme_visit = 0;
  std::size_t streamed = 0, on_nvme = 0;
  for (std::size_t p = 0; p < parts.size(); ++p) {
    const Part& part = parts[p];
    ZoBundles& b = layout.parts[p];
    if (part.kind != models::Part::kBlock) continue;
    largest_block = std::max(largest_block, part.numel);
    b.home = zo_block_home(config.zo, part.index, blocks);
    b.compressed = part.trainable() && zo_compressed(config.zo, part.index, blocks);
    if (b.home == Tier::kGpu) continue;
    const std::uint64_t bytes = b.compressed ? stored(transfer_bytes(part))
                                             : stored(weights_bytes(part)) + state_count * stored(state_bytes(part)) +
                                                   frozen_visit_bytes(part, config);
    visit = std::max(visit, bytes);
    ++streamed;
    if (b.home != Tier::kNvme) continue;
    nvme_visit = std::max(nvme_visit, bytes);
    ++on_nvme;
  }
  const auto in_flight = static_cast<std::size_t>(config.zo.blocks_in_flight);
  layout.window = reserve(store, Tier::kGpu, std::min(in_flight, streamed) * visit, "blocks in flight", demand);
  layout.nvme_staging =
      reserve(store, Tier::kHost, std::min(in_flight, on_nvme) * nvme_visit, "NVMe staging", demand);

  auto add = [&](const std::string& name, std::uint64_t bytes, Tier home, const char* role) {
    BundleSpec spec{name, bytes, home};
    if (home != Tier::kGpu) spec.pools[static_cast<int>(Tier::kGpu)] = layout.window;
    if (home == Tier::kNvme) spec.pools[static_cast<int>(Tier::kHost)] = layout.nvme_staging;
    record(demand, home, role, stored(bytes));
    return store.add(spec);
  };
  // Note: a block computes from one of two device slots, block i from slot i % 2: while one
  // block's forwards read one slot, the next block's perturbed copy is written into the other.
  // The slot's previous user, block i - 2, queued its forwards earlier on the same stream, so
  // writing the slot needs no other ordering.
  const std::size_t slot_count = std::min<std::size_t>(kZoComputeSlots, static_cast<std::size_t>(blocks));
  std::vector<BundleId> slots;
  for (std::size_t i = 0; i < slot_count && largest_block > 0; ++i) {
    slots.push_back(add("block slot " + std::to_string(i), static_cast<std::uint64_t>(largest_block) * compute_size,
                        Tier::kGpu, "block compute slots"));
  }
  for (std::size_t p = 0; p < parts.size(); ++p) {
    Part& part = parts[p];
    ZoBundles& b = layout.parts[p];
    const bool block = part.kind == models::Part::kBlock;
    const bool resident = b.home == Tier::kGpu;
    if (part.frozen_numel > 0) {
      part.frozen = add(part.name + ".frozen", frozen_bytes(part, config), b.home, "frozen parameters");
    }
    if (!part.trainable()) continue;  // no weights, states or compute copy to keep
    b.weights = add(part.name + ".weights", weights_bytes(part), b.home,
                    !block ? "stem and head" : resident ? "resident block weights" : "block weights");
    for (int i = 0; i < state_count; ++i) {
      b.states.push_back(add(part.name + ".state" + std::to_string(i), state_bytes(part), b.home,
                             !block      ? "stem and head"
                             : resident ? "resident block optimizer states"
                                        : "block optimizer states"));
    }
    b.compute = block ? slots[static_cast<std::size_t>(part.index) % slot_count]
                      : add(part.name + ".compute", static_cast<std::uint64_t>(part.numel) * compute_size, Tier::kGpu,
                            "stem and head compute copies");
    if (b.compressed) {
      b.transfer = add(part.name + ".transfer", transfer_bytes(part), Tier::kHost, "block transfer copies");
    }
  }
  return layout;
}

TierDemand count_zo(const std::vector<PartShape>& shapes, const EngineConfig& config) {
  return count(config, [&](Store& store, TierDemand* demand) {
    std::vector<Part> parts = parts_of(shapes);
    lay_out_zo(store, parts, config, demand);
  });
}

}  // namespace ferry::detail
