// The placement value: the presets that produce one, its checks, its JSON and its summary.

#include <algorithm>
#include <array>
#include <map>

#include <nlohmann/json.hpp>

#include "engine/sizing.h"
#include "engine/update.h"
#include "ferry/check.h"

namespace ferry {
namespace {

constexpr Tier kTiers[] = {Tier::kGpu, Tier::kHost, Tier::kNvme};

PartPlacement uniform(Tier params, Tier rest) {
  PartPlacement home;
  home.params = params;
  home.grads = home.master = home.accumulator = rest;
  for (Tier& state : home.states) state = rest;
  return home;
}

// The roles of a part as (name, tier) pairs, those the job has.
std::vector<std::pair<std::string, Tier>> roles_of(const PartPlacement& home, const PlacementRoles& roles) {
  std::vector<std::pair<std::string, Tier>> out{{"parameters", home.params}, {"gradients", home.grads}};
  if (roles.master) out.push_back({"fp32 master", home.master});
  for (int i = 0; i < roles.states; ++i) out.push_back({"optimizer state " + std::to_string(i + 1), home.states[i]});
  if (roles.accumulator) out.push_back({"gradient accumulator", home.accumulator});
  return out;
}

std::string part_name(std::size_t part, std::size_t count) {
  if (part == 0) return "stem";
  if (part + 1 == count) return "head";
  return "block." + std::to_string(part - 1);
}

}  // namespace

bool PartPlacement::operator==(const PartPlacement& other) const {
  return params == other.params && grads == other.grads && master == other.master &&
         std::equal(std::begin(states), std::end(states), std::begin(other.states)) &&
         accumulator == other.accumulator;
}

std::vector<std::string> describe_placement(const Placement& placement, const PlacementRoles& roles) {
  std::vector<std::string> lines;
  if (placement.parts.empty()) return lines;
  auto counts_line = [](const std::string& what, const std::array<std::size_t, kTierCount>& counts,
                        const char* unit) {
    std::string line = what + ":";
    bool first = true;
    for (Tier tier : kTiers) {
      const std::size_t count = counts[static_cast<int>(tier)];
      if (count == 0) continue;
      line += detail::concat(first ? " " : ", ", count, first ? std::string(" ") + unit + " on " : " on ",
                             to_string(tier));
      first = false;
    }
    return line;
  };
  const std::vector<std::pair<std::string, Tier>> names = roles_of(placement.parts.front(), roles);
  for (std::size_t r = 0; r < names.size(); ++r) {
    std::array<std::size_t, kTierCount> counts{};
    for (const PartPlacement& home : placement.parts) ++counts[static_cast<int>(roles_of(home, roles)[r].second)];
    lines.push_back(counts_line(names[r].first, counts, "parts"));
  }
  std::array<std::size_t, kTierCount> updates{};
  for (const PartPlacement& home : placement.parts) ++updates[static_cast<int>(home.updated_on_gpu() ? Tier::kGpu : Tier::kHost)];
  lines.push_back(detail::concat("updates: ", updates[0], " parts on the gpu, ", updates[1], " by the cpu"));
  std::array<std::size_t, kTierCount> checkpoints{}, graphs{};
  for (const BlockActivations& block : placement.activations) {
    ++(block.recompute ? checkpoints : graphs)[static_cast<int>(block.tier)];
  }
  if (!placement.activations.empty()) {
    lines.push_back(counts_line("checkpoints", checkpoints, "blocks"));
    if (graphs[0] > 0) lines.push_back(detail::concat("kept graphs: ", graphs[0], " blocks on gpu"));
  }
  return lines;
}

std::string placement_to_json(const Placement& placement) {
  nlohmann::json parts = nlohmann::json::array();
  for (const PartPlacement& home : placement.parts) {
    parts.push_back({{"params", to_string(home.params)},
                     {"grads", to_string(home.grads)},
                     {"master", to_string(home.master)},
                     {"states", {to_string(home.states[0]), to_string(home.states[1])}},
                     {"accumulator", to_string(home.accumulator)}});
  }
  nlohmann::json activations = nlohmann::json::array();
  for (const BlockActivations& block : placement.activations) {
    activations.push_back(block.recompute ? to_string(block.tier) : "graph");
  }
  return nlohmann::json{{"parts", parts}, {"activations", activations}}.dump();
}

Placement placement_from_json(const std::string& json_text) {
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(json_text);
  } catch (const nlohmann::json::exception& error) {
    throw Error(detail::concat("a placement is not valid JSON: ", error.what()));
  }
  FERRY_CHECK(json.is_object() && json.contains("parts") && json["parts"].is_array(),
              "a placement is a JSON object with a list \"parts\" (one entry per part) and optionally a list "
              "\"activations\"; got ", json.dump());
  Placement placement;
  const std::size_t count = json["parts"].size();
  for (std::size_t p = 0; p < count; ++p) {
    const nlohmann::json& entry = json["parts"][p];
    auto tier = [&](const nlohmann::json& value, const char* role) {
      FERRY_CHECK(value.is_string(), "placement of part ", p, " (", part_name(p, count), "): ", role,
                  " must be a tier name (gpu, host or nvme); got ", value.dump());
      try {
        return parse_tier(value.get<std::string>());
      } catch (const Error& error) {
        throw Error(detail::concat("placement of part ", p, " (", part_name(p, count), "), ", role, ": ", error.what()));
      }
    };
    FERRY_CHECK(entry.is_object(), "placement of part ", p, " must be an object with params, grads, master, "
                "states and accumulator; got ", entry.dump());
    for (const auto& [key, value] : entry.items()) {
      FERRY_CHECK(key == "params" || key == "grads" || key == "master" || key == "states" || key == "accumulator",
                  "placement of part ", p, " (", part_name(p, count), "): unknown role '", key,
                  "'; the roles are params, grads, master, states and accumulator");
    }
    PartPlacement home;
    if (entry.contains("params")) home.params = tier(entry["params"], "params");
    if (entry.contains("grads")) home.grads = tier(entry["grads"], "grads");
    home.master = home.accumulator = home.grads;
    for (Tier& state : home.states) state = home.grads;
    if (entry.contains("master")) home.master = tier(entry["master"], "master");
    if (entry.contains("accumulator")) home.accumulator = tier(entry["accumulator"], "accumulator");
    if (entry.contains("states")) {
      const nlohmann::json& states = entry["states"];
      FERRY_CHECK(states.is_array() && states.size() <= kMaxOptimizerStates, "placement of part ", p,
                  ": states must be a list of at most ", kMaxOptimizerStates, " tiers; got ", states.dump());
      for (std::size_t i = 0; i < states.size(); ++i) home.states[i] = tier(states[i], "states");
    }
    placement.parts.push_back(home);
  }
  if (json.contains("activations")) {
    FERRY_CHECK(json["activations"].is_array(), "placement activations must be a list; got ", json["activations"].dump());
    for (const nlohmann::json& value : json["activations"]) {
      FERRY_CHECK(value.is_string(), "placement activations must be names (gpu, host, nvme or graph); got ", value.dump());
      placement.activations.push_back(parse_block_activations(value.get<std::string>()));
    }
  }
  return placement;
}

namespace detail {

PartPlacement preset_part_placement(const EngineConfig& config, std::size_t part, std::size_t count) {
  const bool block = part > 0 && part + 1 < count;
  switch (config.mode) {
    case Mode::kGpu: return uniform(Tier::kGpu, Tier::kGpu);
    case Mode::kZeroOffload: return uniform(Tier::kGpu, Tier::kHost);
    case Mode::kFuyou: {
      const Tier params = !block                                                         ? Tier::kGpu
                          : static_cast<std::int64_t>(part - 1) < config.fuyou.host_blocks ? Tier::kHost
                                                                                           : Tier::kNvme;
      return uniform(params, Tier::kNvme);
    }
    case Mode::kAuto:
    case Mode::kZo2: break;
  }
  FERRY_ASSERT(false, to_string(config.mode), " mode has no preset placement");
  return {};
}

PlacementRoles placement_roles(const EngineConfig& config) {
  return {config.precision != Precision::kF32, optimizer_state_count(config.optimizer), config.grad_accumulation > 1};
}

namespace {

void validate_part(const PartPlacement& home, std::size_t p, std::size_t count, const EngineConfig& config) {
  const std::string name = part_name(p, count);
  const PlacementRoles roles = placement_roles(config);
  const bool block = p > 0 && p + 1 < count;
  FERRY_CHECK(block || home.params == Tier::kGpu, "the ", name, "'s parameters must live on the gpu (only blocks "
              "stream through the device); the placement puts them on ", to_string(home.params));
  for (const auto& [role, tier] : roles_of(home, roles)) {
    FERRY_CHECK(tier != Tier::kNvme || !config.nvme_directories.empty(), "the placement keeps ", name, "'s ", role,
                " on nvme, which needs at least one NVMe directory (--nvme DIR[,DIR...])");
    if (role == "parameters") continue;
    if (home.updated_on_gpu()) {
      FERRY_CHECK(tier == Tier::kGpu, name, " is updated on the gpu (its gradients live there), so its ", role,
                  " must live there too; the placement puts it on ", to_string(tier),
                  ". Put its gradients on host or nvme to update it on the cpu");
    } else {
      FERRY_CHECK(tier != Tier::kGpu, name, " is updated on the cpu (its gradients live on ", to_string(home.grads),
                  "), so its ", role, " must live on host or nvme; the placement puts it on the gpu. Put "
                  "every role but the parameters on the gpu to update it there");
    }
  }
  FERRY_CHECK(!home.updated_on_gpu() || home.params == Tier::kGpu, name, " is updated on the gpu, so its parameters ",
              "must live there too; the placement streams them from ", to_string(home.params));
}

}  // namespace

Placement resolve_placement(const EngineConfig& config, std::size_t count) {
  FERRY_CHECK(config.mode != Mode::kZo2, "zo2 mode places its blocks with ZoConfig, not a first-order placement");
  FERRY_CHECK(count >= 2, "a model needs a stem and a head; got ", count, " parts");
  Placement placement;
  if (config.mode == Mode::kAuto) {
    FERRY_CHECK(!config.placement.parts.empty(), "mode auto runs the placement in EngineConfig::placement, which "
                "is empty: plan one (plan_engine_config(make_plan(request)), or `ferry plan --mode auto`), or "
                "use a preset mode (gpu, zero-offload, fuyou)");
    FERRY_CHECK(config.placement.parts.size() == count, "the placement names ", config.placement.parts.size(),
                " parts but the model has ", count, " (stem, ", count - 2, " blocks, head): plan it for this model");
    placement.parts = config.placement.parts;
  } else {
    FERRY_CHECK(config.placement.parts.empty(), to_string(config.mode), " mode has its own placement, but "
                "EngineConfig::placement names one for ", config.placement.parts.size(),
                " parts: use mode auto to run a placement of your own");
    for (std::size_t p = 0; p < count; ++p) placement.parts.push_back(preset_part_placement(config, p, count));
  }
  for (std::size_t p = 0; p < count; ++p) validate_part(placement.parts[p], p, count, config);
  placement.activations = block_activations(config, static_cast<std::int64_t>(count) - 2);
  for (std::size_t i = 0; i < placement.activations.size(); ++i) {
    FERRY_CHECK(placement.activations[i].recompute || !placement.parts[i + 1].streamed(), "block ", i,
                " activations 'graph' are invalid: its parameters stream from ", to_string(placement.parts[i + 1].params),
                ", and a kept graph would hold them on the device until its backward; use gpu, host or nvme for "
                "its checkpoint");
  }
  return placement;
}

std::vector<BlockActivations> block_activations(const EngineConfig& config, std::int64_t blocks) {
  if (!config.placement.activations.empty()) {
    FERRY_CHECK(static_cast<std::int64_t>(config.placement.activations.size()) == blocks, "activations name ",
                config.placement.activations.size(), " blocks but the model has ", blocks, ": give one per block");
    return config.placement.activations;
  }
  const std::int64_t kept = std::min(blocks, config.keep_graph_blocks);
  std::vector<BlockActivations> out(static_cast<std::size_t>(blocks));
  for (std::int64_t i = 0; i < blocks; ++i) {
    BlockActivations& block = out[static_cast<std::size_t>(i)];
    block.recompute = i < blocks - kept;
    block.tier = block.recompute && config.offload_checkpoints ? Tier::kHost : Tier::kGpu;
  }
  return out;
}

}  // namespace detail
}  // namespace ferry
