// Names of the engine's configuration choices, parsed with errors that list the valid ones,
// and the whole configuration from the JSON the front ends share.

#include <algorithm>

#include <nlohmann/json.hpp>

#include <torch/cuda.h>

#include "ferry/engine.h"
#include "ferry/memory.h"

namespace ferry {
namespace {

template <typename Enum, size_t N>
Enum parse_choice(const std::string& name, const char* what, const Enum (&choices)[N],
                  const char* (*to_name)(Enum)) {
  std::string valid;
  for (Enum choice : choices) {
    if (name == to_name(choice)) return choice;
    valid += (valid.empty() ? "" : ", ") + std::string(to_name(choice));
  }
  throw Error(detail::concat("unknown ", what, " '", name, "': valid ", what, "s are ", valid));
}

using Json = nlohmann::json;

// A number of blocks, as a number or as text (the CLI passes its flags as text), or "auto".
std::int64_t parse_zo_gpu_blocks(const Json& value) {
  if (value.is_number_integer()) return value.get<std::int64_t>();
  const std::string text = value.get<std::string>();
  if (text == "auto") return ZoConfig::kAutoGpuBlocks;
  FERRY_CHECK(!text.empty() && text.find_first_not_of("0123456789") == std::string::npos,
              "zo_gpu_blocks = '", text, "' is invalid: use auto or a number of blocks");
  return std::stoll(text);
}

torch::Device parse_device(const std::string& name) {
  if (name == "auto") {
    return torch::cuda::is_available() ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
  }
  FERRY_CHECK(name == "cpu" || name.rfind("cuda", 0) == 0, "device '", name,
              "' is not valid: use auto, cpu, cuda or cuda:N");
  FERRY_CHECK(name == "cpu" || torch::cuda::is_available(), "device '", name,
              "' was asked for but this build or machine has no CUDA device");
  return torch::Device(name);
}

// A byte count as a number or as text ("24GiB").
std::uint64_t parse_budget(const Json& value) {
  if (value.is_string()) return parse_bytes(value.get<std::string>());
  FERRY_CHECK(value.is_number() && value.get<double>() >= 0,
              "a budget must be a byte count >= 0 or text such as \"24GiB\"; got ", value.dump());
  if (value.is_number_integer()) {
    const std::uint64_t bytes = value.get<std::uint64_t>();
    FERRY_CHECK(bytes < (std::uint64_t{1} << 63), "a budget of ", bytes, " bytes is 2^63 or more: give a smaller one");
    return bytes;
  }
  return parse_bytes(value.dump());  // a float: refused where it is no whole byte count below 2^63
}

// Directories as a JSON list, or as one text with commas ("/mnt/a,/mnt/b"), as the CLI flag.
std::vector<std::string> parse_list(const Json& value) {
  if (!value.is_string()) return value.get<std::vector<std::string>>();
  const std::string text = value.get<std::string>();
  std::vector<std::string> items;
  std::size_t start = 0;
  while (start < text.size()) {
    std::size_t comma = text.find(',', start);
    if (comma == std::string::npos) comma = text.size();
    if (comma > start) items.push_back(text.substr(start, comma - start));
    start = comma + 1;
  }
  return items;
}

struct Setting {
  const char* key;
  void (*read)(const Json& value, EngineConfig& config);
};

// Note: the reads use nlohmann's typed get<>(), which throws for a value of the wrong type;
// engine_config_from_json turns that into a ferry::Error naming the setting.
const std::vector<Setting>& settings() {
  static const std::vector<Setting> kSettings = {
      {"mode", [](const Json& v, EngineConfig& c) { c.mode = parse_mode(v.get<std::string>()); }},
      // "auto" is resolved once the device is known (engine_config_from_json).
      {"precision",
       [](const Json& v, EngineConfig& c) {
         if (v != "auto") c.precision = parse_precision(v.get<std::string>());
       }},
      {"device",
       [](const Json& v, EngineConfig& c) { c.device = parse_device(v.get<std::string>()); }},
      {"gpu_budget", [](const Json& v, EngineConfig& c) { c.gpu_budget_bytes = parse_budget(v); }},
      {"gpu_working", [](const Json& v, EngineConfig& c) { c.gpu_working_bytes = parse_budget(v); }},
      {"host_budget",
       [](const Json& v, EngineConfig& c) { c.host_budget_bytes = parse_budget(v); }},
      {"optimizer",
       [](const Json& v, EngineConfig& c) {
         c.optimizer.kind = parse_optimizer(v.get<std::string>());
       }},
      {"lr", [](const Json& v, EngineConfig& c) { c.optimizer.lr = v.get<double>(); }},
      {"beta1", [](const Json& v, EngineConfig& c) { c.optimizer.beta1 = v.get<double>(); }},
      {"beta2", [](const Json& v, EngineConfig& c) { c.optimizer.beta2 = v.get<double>(); }},
      {"eps", [](const Json& v, EngineConfig& c) { c.optimizer.eps = v.get<double>(); }},
      {"weight_decay",
       [](const Json& v, EngineConfig& c) { c.optimizer.weight_decay = v.get<double>(); }},
      {"momentum", [](const Json& v, EngineConfig& c) { c.optimizer.momentum = v.get<double>(); }},
      {"nesterov", [](const Json& v, EngineConfig& c) { c.optimizer.nesterov = v.get<bool>(); }},
      {"schedule", [](const Json& v,
                      EngineConfig& c) { c.schedule.kind = parse_schedule(v.get<std::string>()); }},
      {"warmup",
       [](const Json& v, EngineConfig& c) { c.schedule.warmup_steps = v.get<std::int64_t>(); }},
      {"steps",
       [](const Json& v, EngineConfig& c) { c.schedule.total_steps = v.get<std::int64_t>(); }},
      {"min_lr_ratio",
       [](const Json& v, EngineConfig& c) { c.schedule.min_lr_ratio = v.get<double>(); }},
      {"grad_accum",
       [](const Json& v, EngineConfig& c) { c.grad_accumulation = v.get<std::int64_t>(); }},
      {"max_grad_norm", [](const Json& v, EngineConfig& c) { c.max_grad_norm = v.get<double>(); }},
      {"loss_scale",
       [](const Json& v, EngineConfig& c) {
         c.loss_scale.enabled = v.is_null() ? std::nullopt : std::optional<bool>(v.get<bool>());
       }},
      {"keep_graph_blocks",
       [](const Json& v, EngineConfig& c) { c.keep_graph_blocks = v.get<std::int64_t>(); }},
      {"offload_checkpoints",
       [](const Json& v, EngineConfig& c) { c.offload_checkpoints = v.get<bool>(); }},
      {"optimizer_threads",
       [](const Json& v, EngineConfig& c) { c.optimizer_threads = v.get<int>(); }},
      {"trace",
       [](const Json& v, EngineConfig& c) {
         c.trace = v.is_string() ? !v.get<std::string>().empty() : v.get<bool>();
       }},
      {"nvme", [](const Json& v, EngineConfig& c) { c.nvme_directories = parse_list(v); }},
      {"nvme_queue_depth", [](const Json& v, EngineConfig& c) { c.nvme_queue_depth = v.get<unsigned>(); }},
      {"nvme_block", [](const Json& v, EngineConfig& c) { c.nvme_block_bytes = parse_budget(v); }},
      {"nvme_budget",
       [](const Json& v, EngineConfig& c) { c.nvme_budget_bytes = parse_budget(v); }},
      {"staged", [](const Json& v, EngineConfig& c) { c.staged = v.get<std::string>(); }},
      {"verify", [](const Json& v, EngineConfig& c) { c.verify = parse_verify(v.get<std::string>()); }},
      {"seed", [](const Json& v, EngineConfig& c) { c.zo.seed = c.dropout.seed = v.get<std::uint64_t>(); }},
      {"dropout",
       [](const Json& v, EngineConfig& c) {
         const bool model_rates = v.is_null() || (v.is_string() && v.get<std::string>() == "auto");
         c.dropout.rate = model_rates ? std::nullopt : std::optional<double>(v.get<double>());
         FERRY_CHECK(!c.dropout.rate || (*c.dropout.rate >= 0 && *c.dropout.rate < 1), "dropout = ", v.dump(),
                     " is invalid: valid are auto (the model's config.json) or a rate 0 <= p < 1");
       }},
      {"zo_eps", [](const Json& v, EngineConfig& c) { c.zo.eps = v.get<double>(); }},
      {"zo_samples", [](const Json& v, EngineConfig& c) { c.zo.samples = v.get<std::int64_t>(); }},
      {"zo_blocks",
       [](const Json& v, EngineConfig& c) { c.zo.block_tier = parse_tier(v.get<std::string>()); }},
      {"zo_gpu_blocks",
       [](const Json& v, EngineConfig& c) { c.zo.gpu_blocks = parse_zo_gpu_blocks(v); }},
      {"zo_host_blocks",
       [](const Json& v, EngineConfig& c) { c.zo.host_blocks = v.get<std::int64_t>(); }},
      {"zo_storage",
       [](const Json& v, EngineConfig& c) {
         const std::string name = v.is_null() ? "" : v.get<std::string>();
         c.zo.storage = name.empty() ? std::nullopt : std::optional(parse_precision(name));
       }},
      {"zo_transfer",
       [](const Json& v, EngineConfig& c) { c.zo.transfer = parse_zo_transfer(v.get<std::string>()); }},
      {"zo_window",
       [](const Json& v, EngineConfig& c) { c.zo.blocks_in_flight = v.get<std::int64_t>(); }},
      {"zo_write_back",
       [](const Json& v, EngineConfig& c) { c.zo.write_back_interval = v.get<std::int64_t>(); }},
      {"base_storage",
       [](const Json& v, EngineConfig& c) { c.base_storage = parse_base_storage(v.get<std::string>()); }},
      {"micro_batch_order",
       [](const Json& v, EngineConfig& c) {
         c.micro_batch_order = parse_micro_batch_order(v.get<std::string>());
       }},
      {"fuyou_host_blocks",
       [](const Json& v, EngineConfig& c) { c.fuyou.host_blocks = v.get<std::int64_t>(); }},
      {"fuyou_window",
       [](const Json& v, EngineConfig& c) { c.fuyou.blocks_in_flight = v.get<std::int64_t>(); }},
      {"delayed_update",
       [](const Json& v, EngineConfig& c) { c.delayed_update.enabled = v.get<bool>(); }},
      {"delayed_update_warmup",
       [](const Json& v, EngineConfig& c) { c.delayed_update.warmup_steps = v.get<std::int64_t>(); }},
      {"activations",
       [](const Json& v, EngineConfig& c) {
         c.placement.activations.clear();
         for (const std::string& name : parse_list(v)) c.placement.activations.push_back(parse_block_activations(name));
       }},
      {"placement",
       [](const Json& v, EngineConfig& c) {
         const std::vector<BlockActivations> activations = std::move(c.placement.activations);
         c.placement = placement_from_json(v.dump());
         if (c.placement.activations.empty()) c.placement.activations = activations;
       }},
  };
  return kSettings;
}

}  // namespace

const std::vector<std::string>& engine_config_keys() {
  static const std::vector<std::string> kKeys = [] {
    std::vector<std::string> keys;
    for (const Setting& setting : settings()) keys.push_back(setting.key);
    return keys;
  }();
  return kKeys;
}

EngineConfig engine_config_from_json(const std::string& json_text) {
  Json json;
  try {
    json = Json::parse(json_text);
  } catch (const Json::exception& error) {
    throw Error(detail::concat("engine settings are not valid JSON: ", error.what()));
  }
  FERRY_CHECK(json.is_object(), "engine settings must be a JSON object; got ", json.dump());
  EngineConfig config;
  for (const auto& [key, value] : json.items()) {
    auto setting = std::find_if(settings().begin(), settings().end(),
                                [&](const Setting& s) { return key == s.key; });
    if (setting == settings().end()) {
      std::string valid;
      for (const std::string& name : engine_config_keys()) {
        valid += (valid.empty() ? "" : ", ") + name;
      }
      throw Error(detail::concat("unknown engine setting '", key, "'; valid settings: ", valid));
    }
    try {
      setting->read(value, config);
    } catch (const Json::exception&) {
      throw Error(detail::concat("engine setting '", key, "' has the wrong type: ", value.dump()));
    }
  }
  if (json.value("precision", "") == "auto") config.precision = preferred_precision(config.device);
  return config;
}

const char* to_string(Mode mode) {
  switch (mode) {
    case Mode::kGpu: return "gpu";
    case Mode::kZeroOffload: return "zero-offload";
    case Mode::kFuyou: return "fuyou";
    case Mode::kAuto: return "auto";
    case Mode::kZo2: return "zo2";
  }
  return "unknown";
}

Mode parse_mode(const std::string& name) {
  static const Mode kModes[] = {Mode::kGpu, Mode::kZeroOffload, Mode::kFuyou, Mode::kAuto, Mode::kZo2};
  return parse_choice(name, "mode", kModes, to_string);
}

const char* to_string(MicroBatchOrder order) {
  switch (order) {
    case MicroBatchOrder::kBatchMajor: return "batch-major";
    case MicroBatchOrder::kLayerMajor: return "layer-major";
  }
  return "unknown";
}

MicroBatchOrder parse_micro_batch_order(const std::string& name) {
  static const MicroBatchOrder kOrders[] = {MicroBatchOrder::kBatchMajor, MicroBatchOrder::kLayerMajor};
  return parse_choice(name, "micro-batch order", kOrders, to_string);
}

std::string BlockActivations::describe() const {
  return std::string(recompute ? "recompute from " : "graph on ") + to_string(tier);
}

BlockActivations parse_block_activations(const std::string& name) {
  if (name == "graph") return {false, Tier::kGpu};
  for (Tier tier : {Tier::kGpu, Tier::kHost, Tier::kNvme}) {
    if (name == to_string(tier)) return {true, tier};
  }
  throw Error(detail::concat("unknown block activations '", name,
                             "': use gpu, host or nvme (recompute from a checkpoint on that tier) "
                             "or graph (keep the autograd graph on the gpu)"));
}

const char* to_string(ZoTransfer transfer) {
  switch (transfer) {
    case ZoTransfer::kStorage: return "storage";
    case ZoTransfer::kBF16: return "bf16";
    case ZoTransfer::kFp8: return "fp8";
  }
  return "unknown";
}

ZoTransfer parse_zo_transfer(const std::string& name) {
  static const ZoTransfer kTransfers[] = {ZoTransfer::kStorage, ZoTransfer::kBF16, ZoTransfer::kFp8};
  return parse_choice(name, "zo transfer", kTransfers, to_string);
}

const char* to_string(BaseStorage storage) {
  switch (storage) {
    case BaseStorage::kCompute: return "compute";
    case BaseStorage::kFp8: return "fp8";
  }
  return "unknown";
}

BaseStorage parse_base_storage(const std::string& name) {
  static const BaseStorage kStorages[] = {BaseStorage::kCompute, BaseStorage::kFp8};
  return parse_choice(name, "base storage", kStorages, to_string);
}

Tier parse_tier(const std::string& name) {
  static const Tier kTiers[] = {Tier::kGpu, Tier::kHost, Tier::kNvme};
  return parse_choice(name, "tier", kTiers, to_string);
}

const char* to_string(Precision precision) {
  switch (precision) {
    case Precision::kF32: return "fp32";
    case Precision::kBF16: return "bf16";
    case Precision::kF16: return "fp16";
  }
  return "unknown";
}

Precision preferred_precision(const torch::Device& device) {
  return device.is_cuda() ? Precision::kBF16 : Precision::kF32;
}

Precision parse_precision(const std::string& name) {
  static const Precision kPrecisions[] = {Precision::kF32, Precision::kBF16, Precision::kF16};
  return parse_choice(name, "precision", kPrecisions, to_string);
}

const char* to_string(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::kAdamW: return "adamw";
    case OptimizerKind::kAdam: return "adam";
    case OptimizerKind::kSgd: return "sgd";
    case OptimizerKind::kAdagrad: return "adagrad";
  }
  return "unknown";
}

OptimizerKind parse_optimizer(const std::string& name) {
  static const OptimizerKind kKinds[] = {OptimizerKind::kAdamW, OptimizerKind::kAdam,
                                         OptimizerKind::kSgd, OptimizerKind::kAdagrad};
  return parse_choice(name, "optimizer", kKinds, to_string);
}

const char* to_string(LrSchedule schedule) {
  switch (schedule) {
    case LrSchedule::kConstant: return "constant";
    case LrSchedule::kLinear: return "linear";
    case LrSchedule::kCosine: return "cosine";
  }
  return "unknown";
}

LrSchedule parse_schedule(const std::string& name) {
  static const LrSchedule kSchedules[] = {LrSchedule::kConstant, LrSchedule::kLinear,
                                          LrSchedule::kCosine};
  return parse_choice(name, "schedule", kSchedules, to_string);
}

}  // namespace ferry
