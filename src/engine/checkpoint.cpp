// Engine checkpoints: weights as safetensors under Hugging Face names (with config.json, so
// transformers loads the directory), the optimizer state in the layout of torch's optimizers,
// and trainer_state.json with every tensor's XXH64. Written through the Env into a temporary
// directory, every file fsynced, then swapped in atomically, so a failure or a crash mid-save
// leaves the previous checkpoint intact. Saving and loading go one part at a time through the
// strategies' per-part readers and writers; loading checks what it reads against the checksums.
// With several ranks whose states are sharded, each rank writes its shards into a file of its own
// and loading re-shards them into any world size (the rank files section below).

#include "engine/checkpoint.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>

#include "engine/data_parallel.h"
#include "engine/trainer.h"
#include "ferry/check.h"
#include "ferry/fs.h"
#include "ferry/io.h"
#include "ferry/safetensors.h"
#include "ferry/store.h"

namespace ferry {
namespace {

constexpr const char* kFormat = "ferry-checkpoint-1";
// A checkpoint of several ranks whose optimizer states are sharded: each rank's shards in a file of
// its own (rank_file), the weights in the compute dtype (docs/distributed.md).
constexpr const char* kRankFilesFormat = "ferry-checkpoint-2";
constexpr const char* kMasterState = "master";  // the fp32 master's shards, in rank files
constexpr const char* kOptimizerFile = "optimizer.safetensors";
constexpr const char* kStateFile = "trainer_state.json";

std::vector<std::string> state_names(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::kAdamW:
    case OptimizerKind::kAdam: return {"exp_avg", "exp_avg_sq"};
    case OptimizerKind::kSgd: return {"momentum_buffer"};
    case OptimizerKind::kAdagrad: return {"sum"};
  }
  return {};
}

std::string tensor_name(const LayeredModel& model, const detail::Part& part,
                        const detail::ParameterSlice& slice) {
  if (model.config()) return models::hf_name(*model.config(), part.kind, part.index, slice.name);
  return part.name + "." + slice.name;
}

std::string rank_file(int rank) { return "optimizer.rank" + std::to_string(rank) + ".safetensors"; }

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  FERRY_CHECK(in.good(), "cannot read '", path, "': ", std::strerror(errno));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// Puts `staged` in place of `target` in one step: RENAME_EXCHANGE when target exists, so there
// is no moment without a complete checkpoint at `target`.
void swap_into_place(Env& env, const std::string& staged, const std::string& target) {
  if (!fs::exists(target)) {
    env.rename(staged, target);
  } else {
    env.exchange(staged, target);
    fs::remove_tree(staged);  // now the previous checkpoint
  }
  env.sync_directory(fs::parent_directory(target));
}

std::string hex(std::uint64_t value) {
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(value));
  return text;
}

constexpr const char* kChecksumAlgorithm = "xxh64";

// Which tensors a load checks: all of them, none, or (sampled) a random selection of at least a
// sixteenth of the bytes, drawn anew each time so that repeated loads cover everything.
std::set<std::string> tensors_to_verify(const std::vector<std::pair<std::string, std::uint64_t>>& tensors,
                                        Verify verify) {
  std::uint64_t total = 0;
  for (const auto& tensor : tensors) total += tensor.second;
  if (verify == Verify::kAuto) verify = total <= kFullVerifyCheckpointBytes ? Verify::kFull : Verify::kSampled;
  std::set<std::string> chosen;
  if (verify == Verify::kNone) return chosen;
  if (verify == Verify::kFull) {
    for (const auto& tensor : tensors) chosen.insert(tensor.first);
    return chosen;
  }
  std::vector<std::size_t> order(tensors.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), std::mt19937_64(std::random_device{}()));
  std::uint64_t covered = 0;
  for (std::size_t i : order) {
    if (covered * 16 >= total) break;
    chosen.insert(tensors[i].first);
    covered += tensors[i].second;
  }
  return chosen;
}

nlohmann::json parse_extra(const std::string& extra_json) {
  try {
    return nlohmann::json::parse(extra_json);
  } catch (const nlohmann::json::exception& error) {
    throw Error(detail::concat("save(): extra state is not valid JSON: ", error.what()));
  }
}

// Reads trainer_state.json and checks that the checkpoint suits an engine of this mode family.
nlohmann::json read_state(const std::string& dir, const EngineConfig& config) {
  FERRY_CHECK(fs::is_directory(dir), "checkpoint directory '", dir, "' does not exist");
  nlohmann::json state;
  try {
    state = nlohmann::json::parse(read_text_file(dir + "/" + kStateFile));
  } catch (const nlohmann::json::exception& error) {
    throw Error(detail::concat(dir, "/", kStateFile, " is not valid JSON: ", error.what()));
  }
  const std::string format = state.value("format", "");
  FERRY_CHECK(format == kFormat || format == kRankFilesFormat, dir, "/", kStateFile, " has format '", format,
              "'; this ferry reads '", kFormat, "' and '", kRankFilesFormat, "'");
  FERRY_CHECK(state.value("optimizer", "") == to_string(config.optimizer.kind), "checkpoint '",
              dir, "' holds ", state.value("optimizer", "?"), " state but the engine runs ",
              to_string(config.optimizer.kind));
  const bool saved_zo2 = state.value("mode", "") == to_string(Mode::kZo2);
  FERRY_CHECK(saved_zo2 == (config.mode == Mode::kZo2), "checkpoint '", dir, "' was written in ",
              state.value("mode", "?"), " mode, whose optimizer state means something else in ",
              to_string(config.mode), " mode");
  return state;
}

const float* flat_data(const torch::Tensor& values, std::int64_t numel, const detail::Part& part, const char* what) {
  FERRY_ASSERT(values.device().is_cpu() && values.scalar_type() == torch::kFloat &&
                   values.is_contiguous() && values.numel() == numel,
               part.name, "'s ", what, " must be ", numel, " contiguous fp32 values on the host");
  return values.data_ptr<float>();
}

const float* part_data(const torch::Tensor& values, const detail::Part& part, const char* what) {
  return flat_data(values, part.numel, part, what);
}

// The checksum trainer_state.json records for tensor `name` in `file`.
std::string recorded_checksum(const std::string& dir, const nlohmann::json& checksums, const std::string& file,
                              const std::string& name) {
  const nlohmann::json& files = checksums.at("files");
  FERRY_CHECK(files.contains(file) && files[file].contains(name), "checkpoint '", dir, "': trainer_state.json ",
              "records no checksum for tensor '", name, "' in ", file, ": the checkpoint is damaged; load ",
              "another one (or this one with verify none, at your own risk)");
  return files[file][name].get<std::string>();
}

void check_checksum(const std::string& dir, const std::string& file, const std::string& name, const std::string& sum,
                    const void* data, std::uint64_t bytes) {
  const std::string read = hex(xxh64(data, bytes));
  FERRY_CHECK(read == sum, "checkpoint '", dir, "' is corrupt: tensor '", name, "' in ", file,
              " does not match the checksum recorded when it was saved (xxh64 ", sum, " recorded, ", read,
              " read): the file was changed or damaged on disk. Load an earlier checkpoint, or this one with ",
              "verify none to read it anyway");
}

void write_model_config(Env& env, const std::string& staged, const LayeredModel& model, DType weight_dtype) {
  if (!model.config()) return;
  models::ModelConfig config = *model.config();
  config.dtype = weight_dtype;
  write_file_durably(env, staged + "/config.json", config.to_hf_json());
}

void check_tensor(const safetensors::TensorInfo* info, const std::string& dir, const char* file,
                  const std::string& name, const detail::ParameterSlice& slice) {
  FERRY_CHECK(info != nullptr, "checkpoint '", dir, "' has no tensor '", name, "' in ", file,
              ": it was written for another model or optimizer");
  FERRY_CHECK(info->shape == slice.shape && info->dtype == DType::kF32, "checkpoint '", dir,
              "': tensor '", name, "' is ", dtype_name(info->dtype), " ",
              torch::IntArrayRef(info->shape), " but the model has F32 ",
              torch::IntArrayRef(slice.shape), ": it was written for another model");
}

// What a checkpoint of trained parameters needs of the frozen ones it was trained over: their
// count, the adapters' settings, which the tensors' names and shapes do not say, and an fp8 base's
// storage (its rounding is part of what the adapters were trained against).
nlohmann::json base_identity(const LayeredModel& model, const std::vector<detail::Part>& parts,
                             const EngineConfig& config) {
  std::int64_t frozen = 0;
  bool fp8 = false;
  for (const detail::Part& part : parts) {
    frozen += part.frozen_numel;
    fp8 = fp8 || detail::fp8_frozen(part, config);
  }
  nlohmann::json base = {{"frozen_parameters", frozen}};
  if (fp8) base["storage"] = to_string(BaseStorage::kFp8);
  if (model.config() && model.config()->lora.enabled()) {
    const models::LoraConfig& lora = model.config()->lora;
    base["lora"] = {{"rank", lora.rank}, {"alpha", lora.alpha}, {"dropout", lora.dropout}, {"targets", lora.targets}};
  }
  return base;
}

void check_base(const std::string& dir, const nlohmann::json& state, const nlohmann::json& expected) {
  const nlohmann::json saved = state.value("base", nlohmann::json{{"frozen_parameters", 0}});
  FERRY_CHECK(saved == expected, "checkpoint '", dir, "' was trained over frozen parameters ", saved.dump(),
              " but the engine has ", expected.dump(), ": resume it over the same base model and LoRA settings");
}

// The tensors PEFT's merge gives for a model with LoRA adapters: every parameter but the adapters,
// trained and frozen alike, each adapted weight merged with its adapters (models::merge_lora).
// Laid out per part as write_weights_directory takes them.
std::vector<detail::Part> merged_parts(const std::vector<detail::Part>& parts) {
  std::vector<detail::Part> merged;
  for (const detail::Part& part : parts) {
    detail::Part out;
    out.name = part.name;
    out.kind = part.kind;
    out.index = part.index;
    for (const auto* slices : {&part.slices, &part.frozen_slices}) {
      for (const detail::ParameterSlice& slice : *slices) {
        if (slice.name.find(".lora_A.") != std::string::npos || slice.name.find(".lora_B.") != std::string::npos) {
          continue;
        }
        detail::ParameterSlice copy = slice;
        copy.offset = out.numel;
        out.numel += slice.numel;
        out.slices.push_back(std::move(copy));
      }
    }
    merged.push_back(std::move(out));
  }
  return merged;
}

// One part's tensors by name, as views of its trained and frozen values.
std::map<std::string, torch::Tensor> named_values(const detail::Part& part, const torch::Tensor& trained,
                                                  const torch::Tensor& frozen) {
  std::map<std::string, torch::Tensor> named;
  for (const detail::ParameterSlice& slice : part.slices) {
    named[slice.name] = trained.narrow(0, slice.offset, slice.numel).view(slice.shape);
  }
  for (const detail::ParameterSlice& slice : part.frozen_slices) {
    named[slice.name] = frozen.narrow(0, slice.offset, slice.numel).view(slice.shape);
  }
  return named;
}

// PEFT's target_modules for the adapted linears: each one's last name, or its whole name where
// another linear of the block with that last name is not adapted (GPT-2's two c_proj).
std::vector<std::string> peft_target_modules(const models::ModelConfig& config) {
  auto leaf = [](const std::string& module) { return module.substr(module.rfind('.') + 1); };
  std::set<std::string> adapted, names;
  for (const models::LoraTarget& target : config.lora_targets()) adapted.insert(target.module);
  for (const std::string& module : adapted) {
    bool shared = false;
    for (const models::LoraTarget& candidate : config.lora_candidates()) {
      shared |= leaf(candidate.module) == leaf(module) && adapted.count(candidate.module) == 0;
    }
    names.insert(shared ? module : leaf(module));
  }
  return {names.begin(), names.end()};
}

}  // namespace

namespace detail {

// Writes the directory's files into `staged`, each durable, and fsyncs it.
void stage_weights_directory(const std::string& staged, const LayeredModel& model,
                             const std::vector<Part>& parts, DType weight_dtype,
                             const std::vector<std::string>& states, const nlohmann::json& trainer_state,
                             const std::map<std::string, std::string>& extra_files,
                             const PartProducer& produce, Env& env);

void write_checkpoint(const std::string& dir, const LayeredModel& model,
                      const std::vector<Part>& parts, OptimizerKind kind,
                      std::size_t state_count, const nlohmann::json& state,
                      const PartProducer& produce, Env* env) {
  const std::vector<std::string> states = state_names(kind);
  FERRY_ASSERT(state_count <= states.size(), to_string(kind), " has ", states.size(),
               " states per parameter, not ", state_count);
  nlohmann::json full = state;
  full["format"] = kFormat;
  full["optimizer"] = to_string(kind);
  write_weights_directory(dir, model, parts, DType::kF32,
                          std::vector<std::string>(states.begin(), states.begin() + state_count),
                          full, {}, produce, env);
}

void write_weights_directory(const std::string& dir, const LayeredModel& model,
                             const std::vector<Part>& parts, DType weight_dtype,
                             const std::vector<std::string>& states, const nlohmann::json& trainer_state,
                             const std::map<std::string, std::string>& extra_files,
                             const PartProducer& produce, Env* env_in) {
  Env& env = env_or_posix(env_in);
  const std::string staged = dir + ".partial";
  fs::remove_tree(staged);  // what a failed or interrupted save left
  fs::make_directories(staged);
  try {
    stage_weights_directory(staged, model, parts, weight_dtype, states, trainer_state, extra_files, produce, env);
    swap_into_place(env, staged, dir);
  } catch (...) {
    try {
      fs::remove_tree(staged);
    } catch (const Error&) {
      // The save's own error says more; the next save removes what is left.
    }
    throw;
  }
}

void stage_weights_directory(const std::string& staged, const LayeredModel& model,
                             const std::vector<Part>& parts, DType weight_dtype,
                             const std::vector<std::string>& states, const nlohmann::json& trainer_state,
                             const std::map<std::string, std::string>& extra_files,
                             const PartProducer& produce, Env& env) {
  const torch::ScalarType weight_scalar_type = to_scalar_type(weight_dtype);

  // Note: every tensor is declared before any part is produced, so both writers know their
  // headers and shard split up front and take each part's data as it comes.
  std::vector<safetensors::TensorSpec> weight_specs, optimizer_specs;
  for (const Part& part : parts) {
    for (const ParameterSlice& slice : part.slices) {
      const std::string name = tensor_name(model, part, slice);
      weight_specs.push_back({name, weight_dtype, slice.shape});
      for (const std::string& state_name : states) {
        optimizer_specs.push_back({name + "." + state_name, DType::kF32, slice.shape});
      }
    }
  }
  safetensors::Writer weights = safetensors::Writer::checkpoint(
      staged, std::move(weight_specs), models::kDefaultMaxShardBytes, &env);
  std::optional<safetensors::Writer> optimizer;
  if (!optimizer_specs.empty()) {
    optimizer.emplace(
        safetensors::Writer::file(staged + "/" + kOptimizerFile, std::move(optimizer_specs), {}, &env));
  }
  // Every tensor's XXH64, by file: each tensor comes whole in one write.
  nlohmann::json checksums = nlohmann::json::object();
  auto write_summed = [&](safetensors::Writer& writer, const std::string& file, const std::string& name,
                          const void* data, std::uint64_t bytes) {
    writer.write(name, data, bytes);
    checksums[file.empty() ? writer.file_of(name) : file][name] = hex(xxh64(data, bytes));
  };
  const std::uint64_t weight_size = dtype_size(weight_dtype);
  for (std::size_t p = 0; p < parts.size(); ++p) {
    const Part& part = parts[p];
    const PartValues values = produce(p);
    FERRY_ASSERT(values.states.size() == states.size(), part.name, " came with ",
                 values.states.size(), " optimizer states, not ", states.size());
    part_data(values.weights, part, "weights");
    const torch::Tensor part_weights = values.weights.to(weight_scalar_type);
    const auto* weight_bytes = static_cast<const char*>(part_weights.data_ptr());
    std::vector<const float*> part_states;
    for (const torch::Tensor& part_state : values.states) {
      part_states.push_back(part_data(part_state, part, "optimizer state"));
    }
    for (const ParameterSlice& slice : part.slices) {
      const std::string name = tensor_name(model, part, slice);
      const auto numel = static_cast<std::uint64_t>(slice.numel);
      write_summed(weights, "", name, weight_bytes + slice.offset * weight_size, numel * weight_size);
      for (std::size_t i = 0; i < states.size(); ++i) {
        write_summed(*optimizer, kOptimizerFile, name + "." + states[i], part_states[i] + slice.offset, numel * 4);
      }
    }
  }
  weights.finish();
  if (optimizer) optimizer->finish();

  write_model_config(env, staged, model, weight_dtype);
  for (const auto& [name, contents] : extra_files) {
    FERRY_CHECK(!name.empty() && name.find('/') == std::string::npos && name != kStateFile, "extra file '", name,
                "' is not a file name this directory may take");
    write_file_durably(env, staged + "/" + name, contents);
  }
  if (!trainer_state.is_null()) {
    nlohmann::json state = trainer_state;
    state["checksums"] = {{"algorithm", kChecksumAlgorithm}, {"files", checksums}};
    write_file_durably(env, staged + "/" + kStateFile, state.dump(2));
  }
  env.sync_directory(staged);
}

void read_checkpoint(const std::string& dir, const LayeredModel& model,
                     const std::vector<Part>& parts, OptimizerKind kind,
                     std::size_t state_count, const nlohmann::json& checksums, Verify verify,
                     const PartConsumer& consume) {
  const std::vector<std::string> states = state_names(kind);
  FERRY_ASSERT(state_count <= states.size(), to_string(kind), " has ", states.size(),
               " states per parameter, not ", state_count);
  safetensors::Checkpoint weights(dir);
  std::optional<safetensors::Reader> optimizer;
  if (state_count > 0) optimizer.emplace(dir + "/" + kOptimizerFile);

  // Note: the headers are checked whole before the first part is handed over, so a checkpoint
  // of another model leaves the engine as it was. (Opening them already checked that each file
  // is as long as its header says.)
  // Each tensor read, with the file it is in and its recorded checksum.
  std::map<std::string, std::pair<std::string, std::string>> recorded;
  std::vector<std::pair<std::string, std::uint64_t>> sizes;
  auto record = [&](const std::string& name, const std::string& path, std::uint64_t bytes) {
    const std::size_t slash = path.find_last_of('/');
    const std::string file = slash == std::string::npos ? path : path.substr(slash + 1);
    recorded[name] = {file, checksums.is_null() ? "" : recorded_checksum(dir, checksums, file, name)};
    sizes.emplace_back(name, bytes);
  };
  for (const Part& part : parts) {
    for (const ParameterSlice& slice : part.slices) {
      const std::string name = tensor_name(model, part, slice);
      check_tensor(weights.contains(name) ? &weights.tensor(name) : nullptr, dir, "the weights",
                   name, slice);
      const std::uint64_t bytes = static_cast<std::uint64_t>(slice.numel) * 4;
      record(name, weights.file_of(name), bytes);
      for (std::size_t i = 0; i < state_count; ++i) {
        const std::string state_name = name + "." + states[i];
        check_tensor(optimizer->header().find(state_name), dir, kOptimizerFile, state_name, slice);
        record(state_name, optimizer->path(), bytes);
      }
    }
  }
  if (!checksums.is_null()) {
    FERRY_CHECK(checksums.value("algorithm", "") == kChecksumAlgorithm, "checkpoint '", dir, "': checksums of ",
                "algorithm '", checksums.value("algorithm", ""), "'; this ferry checks ", kChecksumAlgorithm);
  }
  const std::set<std::string> verified =
      checksums.is_null() ? std::set<std::string>() : tensors_to_verify(sizes, verify);
  auto check_read = [&](const std::string& name, const void* data, std::uint64_t bytes) {
    if (!verified.count(name)) return;
    const auto& [file, sum] = recorded.at(name);
    check_checksum(dir, file, name, sum, data, bytes);
  };

  for (std::size_t p = 0; p < parts.size(); ++p) {
    const Part& part = parts[p];
    PartValues values;
    values.weights = torch::empty({part.numel}, torch::kFloat);
    for (std::size_t i = 0; i < state_count; ++i) {
      values.states.push_back(torch::empty({part.numel}, torch::kFloat));
    }
    for (const ParameterSlice& slice : part.slices) {
      const std::string name = tensor_name(model, part, slice);
      const std::uint64_t bytes = static_cast<std::uint64_t>(slice.numel) * 4;
      float* weight_data = values.weights.data_ptr<float>() + slice.offset;
      weights.read_into(name, weight_data, bytes);
      check_read(name, weight_data, bytes);
      for (std::size_t i = 0; i < state_count; ++i) {
        float* state_data = values.states[i].data_ptr<float>() + slice.offset;
        optimizer->read_into(name + "." + states[i], state_data, bytes);
        check_read(name + "." + states[i], state_data, bytes);
      }
    }
    consume(p, std::move(values));
  }
}

PartShard Trainer::read_shard(std::size_t part, bool) {
  FERRY_ASSERT(false, "a trainer without sharded states was asked for part ", part, "'s shard");
  return {};
}

void Trainer::write_shard(std::size_t part, const PartShard&) {
  FERRY_ASSERT(false, "a trainer without sharded states was given part ", part, "'s shard");
}

}  // namespace detail

const char* to_string(Verify verify) {
  switch (verify) {
    case Verify::kAuto: return "auto";
    case Verify::kFull: return "full";
    case Verify::kSampled: return "sampled";
    case Verify::kNone: return "none";
  }
  return "?";
}

Verify parse_verify(const std::string& name) {
  for (Verify verify : {Verify::kAuto, Verify::kFull, Verify::kSampled, Verify::kNone}) {
    if (name == to_string(verify)) return verify;
  }
  throw Error(detail::concat("unknown verify level '", name, "': valid are auto, full, sampled and none"));
}

namespace {

// Rank 0 runs `write`; the others read what it reads alongside when the trainer's reads are
// collective (the shards of the optimizer state gathered), and drop it. Every rank then learns
// whether rank 0 succeeded.
//
// Note: `write` must read every trainable part once, in order (the writers here do). Should rank
// 0 fail before its last read, the others wait in their next gather until the communicator's
// timeout, and then fail with it.
template <typename Write>
void rank_zero_writes(detail::Trainer& trainer, const char* what, bool with_states, Write write) {
  detail::on_every_rank(trainer.config().communicator.get(), what, [&] {
    if (detail::rank(trainer.config()) == 0) return write();
    if (!trainer.shards_states()) return;
    for (std::size_t p = 0; p < trainer.parts().size(); ++p) {
      if (trainer.parts()[p].trainable()) trainer.read_part(p, with_states);
    }
  });
}

// --- checkpoints of several ranks ----------------------------------------------------------------
//
// Note: with ZeRO stage 2 every rank holds the parameters whole and only its shard of each part's
// fp32 master and optimizer states. So each rank writes its shards into a file of its own, and rank
// 0 writes the parameters, in the compute dtype, as the checkpoint's weights: nothing is gathered.
// The ranks write into one staged directory (they share the filesystem) and agree on each stage
// before rank 0 swaps it in. The format is in docs/distributed.md.

// Elements [begin, end) of a parameter, flattened in row-major order.
struct ElementRange {
  std::int64_t begin = 0;
  std::int64_t end = 0;

  bool empty() const { return begin >= end; }
  std::int64_t numel() const { return end - begin; }
  bool operator==(const ElementRange& other) const { return begin == other.begin && end == other.end; }
};

// The elements of `slice` that its part's flat range [begin, begin + numel) holds.
ElementRange overlap(const detail::ParameterSlice& slice, std::int64_t begin, std::int64_t numel) {
  return {std::max<std::int64_t>(begin - slice.offset, 0), std::min<std::int64_t>(begin + numel - slice.offset, slice.numel)};
}

// Whether the trainer keeps an fp32 master apart from its parameters (a compute dtype other than fp32).
bool separate_master(const detail::Trainer& trainer) {
  return detail::scalar_type(trainer.config().precision) != torch::kFloat;
}

// What a rank file holds of each parameter: its fp32 master where that is apart from the weights,
// then the optimizer's states.
std::vector<std::string> rank_file_states(const detail::Trainer& trainer) {
  std::vector<std::string> states;
  if (separate_master(trainer)) states.push_back(kMasterState);
  const std::vector<std::string> optimizer = state_names(trainer.config().optimizer.kind);
  states.insert(states.end(), optimizer.begin(), optimizer.begin() + static_cast<std::ptrdiff_t>(trainer.state_count()));
  return states;
}

// Writes this rank's file into `staged`, and on rank 0 the weights and config.json, each durable,
// one part at a time. Returns the XXH64 of every tensor written, by file.
nlohmann::json stage_rank_files(const std::string& staged, detail::Trainer& trainer, Env& env) {
  const LayeredModel& model = trainer.model();
  const std::vector<detail::Part>& parts = trainer.parts();
  const int rank = detail::rank(trainer.config());
  const bool writes_weights = rank == 0;
  const std::vector<std::string> states = rank_file_states(trainer);
  const DType weight_dtype = to_dtype(detail::scalar_type(trainer.config().precision));
  const std::string file = rank_file(rank);

  // Every tensor of a rank file is one state of the elements of one parameter that the rank's
  // shard holds; its metadata says which, so the file reads without this code.
  std::vector<safetensors::TensorSpec> weight_specs, shard_specs;
  std::map<std::string, std::string> metadata = {
      {"ferry", "optimizer shard"}, {"rank", std::to_string(rank)},
      {"world_size", std::to_string(detail::world_size(trainer.config()))}};
  for (const detail::Part& part : parts) {
    for (const detail::ParameterSlice& slice : part.slices) {
      const std::string name = tensor_name(model, part, slice);
      if (writes_weights) weight_specs.push_back({name, weight_dtype, slice.shape});
      const ElementRange range = overlap(slice, part.shard.begin, part.shard.numel);
      if (range.empty()) continue;
      for (const std::string& state : states) {
        shard_specs.push_back({name + "." + state, DType::kF32, {range.numel()}});
        metadata[name + "." + state] = nlohmann::json{{"part", part.name},      {"parameter", name},
                                                      {"state", state},         {"begin", range.begin},
                                                      {"end", range.end},       {"shape", slice.shape}}
                                           .dump();
      }
    }
  }
  std::optional<safetensors::Writer> weights;
  if (writes_weights) {
    weights.emplace(safetensors::Writer::checkpoint(staged, std::move(weight_specs), models::kDefaultMaxShardBytes, &env));
  }
  safetensors::Writer shard = safetensors::Writer::file(staged + "/" + file, std::move(shard_specs), metadata, &env);
  nlohmann::json checksums = nlohmann::json::object();
  auto write_summed = [&](safetensors::Writer& writer, const std::string& in_file, const std::string& name,
                          const void* data, std::uint64_t bytes) {
    writer.write(name, data, bytes);
    checksums[in_file][name] = hex(xxh64(data, bytes));
  };
  const std::uint64_t weight_size = dtype_size(weight_dtype);
  for (std::size_t p = 0; p < parts.size(); ++p) {
    const detail::Part& part = parts[p];
    if (!part.trainable()) continue;
    const detail::PartShard values = trainer.read_shard(p, writes_weights);
    std::vector<const float*> shards;  // by state, from the shard's first element
    if (values.master.defined()) shards.push_back(flat_data(values.master, part.shard.numel, part, "fp32 master"));
    for (const torch::Tensor& state : values.states) {
      shards.push_back(flat_data(state, part.shard.numel, part, "optimizer state"));
    }
    FERRY_ASSERT(shards.size() == states.size(), part.name, " came with ", shards.size(), " shards, not ", states.size());
    torch::Tensor part_weights;
    if (writes_weights) {
      part_data(values.parameters, part, "parameters");
      part_weights = values.parameters.to(to_scalar_type(weight_dtype));
    }
    for (const detail::ParameterSlice& slice : part.slices) {
      const std::string name = tensor_name(model, part, slice);
      if (writes_weights) {
        write_summed(*weights, weights->file_of(name), name,
                     static_cast<const char*>(part_weights.data_ptr()) + slice.offset * weight_size,
                     static_cast<std::uint64_t>(slice.numel) * weight_size);
      }
      const ElementRange range = overlap(slice, part.shard.begin, part.shard.numel);
      if (range.empty()) continue;
      const std::int64_t first = slice.offset + range.begin - part.shard.begin;
      for (std::size_t i = 0; i < states.size(); ++i) {
        write_summed(shard, file, name + "." + states[i], shards[i] + first, static_cast<std::uint64_t>(range.numel()) * 4);
      }
    }
  }
  if (weights) weights->finish();
  shard.finish();
  if (writes_weights) write_model_config(env, staged, model, weight_dtype);
  return checksums;
}

// save() with several ranks whose states are sharded: rank 0 makes the staged directory, every
// rank writes its files into it, rank 0 adds trainer_state.json with every rank's checksums and
// swaps it in. Each stage ends with the ranks agreeing, so a rank's failure stops every rank,
// naming it, and leaves the previous checkpoint at `dir`.
void write_rank_files(const std::string& dir, detail::Trainer& trainer, nlohmann::json state) {
  const EngineConfig& config = trainer.config();
  dist::Communicator* communicator = config.communicator.get();
  Env& env = env_or_posix(config.checkpoint_env);
  const int rank = detail::rank(config);
  const std::string staged = dir + ".partial";
  auto remove_staged = [&] {
    if (rank != 0) return;
    try {
      fs::remove_tree(staged);
    } catch (const Error&) {
      // The save's own error says more; the next save removes what is left.
    }
  };
  detail::on_every_rank(communicator, "save()", [&] {
    if (rank != 0) return;
    fs::remove_tree(staged);  // what a failed or interrupted save left
    fs::make_directories(staged);
  });
  nlohmann::json checksums;
  try {
    detail::on_every_rank(communicator, "save()", [&] { checksums = stage_rank_files(staged, trainer, env); });
    const std::vector<std::string> every_rank = communicator->all_gather_text(checksums.dump());
    detail::on_every_rank(communicator, "save()", [&] {
      if (rank != 0) return;
      nlohmann::json files = nlohmann::json::object();
      std::vector<std::string> names;
      for (std::size_t r = 0; r < every_rank.size(); ++r) {
        files.update(nlohmann::json::parse(every_rank[r]));
        names.push_back(rank_file(static_cast<int>(r)));
      }
      state["format"] = kRankFilesFormat;
      state["optimizer"] = to_string(config.optimizer.kind);
      state["shards"] = {{"layout", "rank files"},
                         {"files", names},
                         {"master", separate_master(trainer) ? "rank files" : "weights"}};
      state["checksums"] = {{"algorithm", kChecksumAlgorithm}, {"files", files}};
      write_file_durably(env, staged + "/" + kStateFile, state.dump(2));
      env.sync_directory(staged);
      swap_into_place(env, staged, dir);
    });
  } catch (...) {
    remove_staged();
    throw;
  }
}

// One tensor of a rank file: elements `range` of one state of one parameter.
struct Fragment {
  std::size_t reader = 0;
  std::string file;
  std::string tensor;
  ElementRange range;
  std::vector<std::int64_t> shape;  // the parameter's
};

// load() of a checkpoint in rank files, into any world size: each rank reads the whole weights
// and, of the rank files, the elements its own shards hold. With the world size that saved it,
// that is its own rank file alone (unless the master must be read whole: a change of precision).
class RankFilesReader {
 public:
  RankFilesReader(const std::string& dir, detail::Trainer& trainer, const nlohmann::json& state)
      : dir_(dir), trainer_(trainer), weights_(dir) {
    const nlohmann::json shards = state.value("shards", nlohmann::json());
    FERRY_CHECK(shards.is_object() && shards.value("layout", "") == "rank files" && shards.contains("files") &&
                    shards["files"].is_array() && !shards["files"].empty() &&
                    (shards.value("master", "") == "rank files" || shards.value("master", "") == "weights"),
                "checkpoint '", dir, "': trainer_state.json's \"shards\" is ", shards.dump(), "; a checkpoint of ",
                "format ", kRankFilesFormat, " records {\"layout\": \"rank files\", \"files\": [...], \"master\": ",
                "\"rank files\" or \"weights\"}");
    const std::vector<std::string> files = shards["files"].get<std::vector<std::string>>();
    master_in_files_ = shards["master"] == "rank files";
    if (state.contains("checksums")) {
      checksums_ = state["checksums"];
      FERRY_CHECK(checksums_.value("algorithm", "") == kChecksumAlgorithm, "checkpoint '", dir, "': checksums of ",
                  "algorithm '", checksums_.value("algorithm", ""), "'; this ferry checks ", kChecksumAlgorithm);
    }
    check_weights();
    const bool separate = separate_master(trainer);
    const DType compute = to_dtype(detail::scalar_type(trainer.config().precision));
    parameters_from_weights_ = !master_in_files_ || (separate && weight_dtype_ == compute);
    const bool whole_master = master_in_files_ && !parameters_from_weights_;
    const int rank = detail::rank(trainer.config());
    const bool own_file_only = static_cast<int>(files.size()) == detail::world_size(trainer.config()) && !whole_master;
    for (std::size_t k = 0; k < files.size(); ++k) {
      if (!own_file_only || static_cast<int>(k) == rank) open(files[k]);
    }
    for (auto& [key, list] : fragments_) {
      std::sort(list.begin(), list.end(),
                [](const Fragment& a, const Fragment& b) { return a.range.begin < b.range.begin; });
    }
  }

  // Checks every part's tensors (throwing before anything is handed over) and chooses which to
  // verify, then reads one part at a time into the trainer.
  void load() {
    const std::vector<detail::Part>& parts = trainer_.parts();
    for (std::size_t p = 0; p < parts.size(); ++p) {
      if (parts[p].trainable()) part_shard(parts[p], /*read=*/false);
    }
    if (!checksums_.is_null()) verified_ = tensors_to_verify(sizes_, trainer_.config().verify);
    for (std::size_t p = 0; p < parts.size(); ++p) {
      if (parts[p].trainable()) trainer_.write_shard(p, part_shard(parts[p], /*read=*/true));
    }
  }

 private:
  void check_weights() {
    for (const detail::Part& part : trainer_.parts()) {
      for (const detail::ParameterSlice& slice : part.slices) {
        const std::string name = tensor_name(trainer_.model(), part, slice);
        FERRY_CHECK(weights_.contains(name), "checkpoint '", dir_, "' has no tensor '", name, "' in the weights: it ",
                    "was written for another model");
        const safetensors::TensorInfo& info = weights_.tensor(name);
        if (!weight_dtype_) weight_dtype_ = info.dtype;
        const bool floating = info.dtype == DType::kF32 || info.dtype == DType::kBF16 || info.dtype == DType::kF16;
        FERRY_CHECK(info.shape == slice.shape && info.dtype == *weight_dtype_ && floating &&
                        (master_in_files_ || info.dtype == DType::kF32),
                    "checkpoint '", dir_, "': tensor '", name, "' is ", dtype_name(info.dtype), " ",
                    torch::IntArrayRef(info.shape), " but the model has ", torch::IntArrayRef(slice.shape), " in ",
                    master_in_files_ ? dtype_name(*weight_dtype_) : "F32", ": it was written for another model");
      }
    }
  }

  void open(const std::string& file) {
    FERRY_CHECK(file.find('/') == std::string::npos, "checkpoint '", dir_, "': rank file '", file,
                "' is not a file name in the checkpoint's directory");
    readers_.emplace_back(dir_ + "/" + file);
    const safetensors::Header& header = readers_.back().header();
    for (const safetensors::TensorInfo& info : header.tensors) {
      const auto found = header.metadata.find(info.name);
      FERRY_CHECK(found != header.metadata.end(), "checkpoint '", dir_, "': tensor '", info.name, "' in ", file,
                  " has no metadata saying which parameter and elements it holds: the file is damaged");
      Fragment fragment{readers_.size() - 1, file, info.name, {}, {}};
      std::string key;
      try {
        const nlohmann::json meta = nlohmann::json::parse(found->second);
        key = meta.at("parameter").get<std::string>() + "." + meta.at("state").get<std::string>();
        fragment.range = {meta.at("begin").get<std::int64_t>(), meta.at("end").get<std::int64_t>()};
        fragment.shape = meta.at("shape").get<std::vector<std::int64_t>>();
      } catch (const nlohmann::json::exception& error) {
        throw Error(detail::concat("checkpoint '", dir_, "': the metadata of tensor '", info.name, "' in ", file,
                                   " is not what ferry writes: ", error.what()));
      }
      FERRY_CHECK(info.dtype == DType::kF32 && info.shape == std::vector<std::int64_t>{fragment.range.numel()} &&
                      fragment.range.begin >= 0 && !fragment.range.empty(),
                  "checkpoint '", dir_, "': tensor '", info.name, "' in ", file, " is ", dtype_name(info.dtype), " ",
                  torch::IntArrayRef(info.shape), " but its metadata says F32 elements [", fragment.range.begin, ", ",
                  fragment.range.end, "): the file is damaged");
      fragments_[key].push_back(std::move(fragment));
    }
  }

  // The part's shard as the trainer takes it (write_shard); with `read` false, only checked, and
  // the tensors it would read recorded for the choice of those to verify.
  detail::PartShard part_shard(const detail::Part& part, bool read) {
    detail::PartShard values;
    const bool separate = separate_master(trainer_);
    const bool weights_needed = !master_in_files_ || (separate && parameters_from_weights_);
    const torch::Tensor weights = weights_needed ? read_weights(part, read) : torch::Tensor();
    auto master = [&](std::int64_t begin, std::int64_t numel) {
      if (master_in_files_) return read_range(part, kMasterState, begin, numel, read);
      return read ? weights.narrow(0, begin, numel) : torch::Tensor();
    };
    const std::vector<std::string> states = state_names(trainer_.config().optimizer.kind);
    for (std::size_t i = 0; i < trainer_.state_count(); ++i) {
      values.states.push_back(read_range(part, states[i], part.shard.begin, part.shard.numel, read));
    }
    if (separate) {
      values.master = master(part.shard.begin, part.shard.numel);
      values.parameters = parameters_from_weights_ ? weights : master(0, part.numel);
    } else {
      values.parameters = master(0, part.numel);
    }
    return values;
  }

  // The part's weights, whole, in fp32 (of the dtype they were saved in).
  torch::Tensor read_weights(const detail::Part& part, bool read) {
    const std::uint64_t size = dtype_size(*weight_dtype_);
    torch::Tensor values = read ? torch::empty({part.numel}, to_scalar_type(*weight_dtype_)) : torch::Tensor();
    for (const detail::ParameterSlice& slice : part.slices) {
      const std::string name = tensor_name(trainer_.model(), part, slice);
      const std::string& path = weights_.file_of(name);
      const std::string file = path.substr(path.find_last_of('/') + 1);
      const std::uint64_t bytes = static_cast<std::uint64_t>(slice.numel) * size;
      if (!read) {
        record(file, name, bytes);
        continue;
      }
      char* data = static_cast<char*>(values.data_ptr()) + slice.offset * size;
      weights_.read_into(name, data, bytes);
      check(file, name, data, bytes);
    }
    return read ? values.to(torch::kFloat) : values;
  }

  // Elements [begin, begin + numel) of the part's flat range of `state`, from the fragments that
  // hold them.
  torch::Tensor read_range(const detail::Part& part, const std::string& state, std::int64_t begin, std::int64_t numel,
                           bool read) {
    torch::Tensor values = read ? torch::empty({numel}, torch::kFloat) : torch::Tensor();
    for (const detail::ParameterSlice& slice : part.slices) {
      const ElementRange wanted = overlap(slice, begin, numel);
      if (wanted.empty()) continue;
      const std::string name = tensor_name(trainer_.model(), part, slice);
      std::int64_t covered = wanted.begin;
      for (const Fragment& fragment : fragments_[name + "." + state]) {
        if (fragment.range.end <= covered || fragment.range.begin >= wanted.end) continue;
        FERRY_CHECK(fragment.shape == slice.shape, "checkpoint '", dir_, "': tensor '", fragment.tensor, "' in ",
                    fragment.file, " holds elements of a parameter of shape ", torch::IntArrayRef(fragment.shape),
                    " but the model's '", name, "' is ", torch::IntArrayRef(slice.shape),
                    ": it was written for another model");
        if (fragment.range.begin > covered) break;
        const ElementRange piece{covered, std::min(fragment.range.end, wanted.end)};
        const std::uint64_t bytes = static_cast<std::uint64_t>(fragment.range.numel()) * 4;
        if (read) {
          read_fragment(fragment, piece, values.data_ptr<float>() + slice.offset + piece.begin - begin);
        } else {
          record(fragment.file, fragment.tensor, bytes);
        }
        covered = piece.end;
      }
      FERRY_CHECK(covered >= wanted.end, "checkpoint '", dir_, "' holds no ", state, " for elements [", covered, ", ",
                  wanted.end, ") of '", name, "' in the rank files read: one is missing, or they were written for ",
                  "another model");
    }
    return values;
  }

  // Note: a fragment is read whole even where only some of it is wanted (another world size), so
  // that its checksum can be checked.
  void read_fragment(const Fragment& fragment, const ElementRange& piece, float* to) {
    const std::uint64_t bytes = static_cast<std::uint64_t>(fragment.range.numel()) * 4;
    const safetensors::Reader& reader = readers_[fragment.reader];
    if (piece == fragment.range) {
      reader.read_into(fragment.tensor, to, bytes);
      check(fragment.file, fragment.tensor, to, bytes);
      return;
    }
    std::vector<float> whole(static_cast<std::size_t>(fragment.range.numel()));
    reader.read_into(fragment.tensor, whole.data(), bytes);
    check(fragment.file, fragment.tensor, whole.data(), bytes);
    std::copy_n(whole.data() + (piece.begin - fragment.range.begin), piece.numel(), to);
  }

  static std::string key(const std::string& file, const std::string& tensor) { return file + "\n" + tensor; }

  void record(const std::string& file, const std::string& tensor, std::uint64_t bytes) {
    if (checksums_.is_null() || !recorded_.emplace(key(file, tensor), recorded_checksum(dir_, checksums_, file, tensor)).second) {
      return;
    }
    sizes_.emplace_back(key(file, tensor), bytes);
  }

  void check(const std::string& file, const std::string& tensor, const void* data, std::uint64_t bytes) const {
    if (!verified_.count(key(file, tensor))) return;
    check_checksum(dir_, file, tensor, recorded_.at(key(file, tensor)), data, bytes);
  }

  std::string dir_;
  detail::Trainer& trainer_;
  safetensors::Checkpoint weights_;
  std::optional<DType> weight_dtype_;
  bool master_in_files_ = false;
  bool parameters_from_weights_ = true;
  std::vector<safetensors::Reader> readers_;
  std::map<std::string, std::vector<Fragment>> fragments_;  // by "<parameter>.<state>", in element order
  nlohmann::json checksums_;
  std::map<std::string, std::string> recorded_;  // by key(file, tensor)
  std::vector<std::pair<std::string, std::uint64_t>> sizes_;
  std::set<std::string> verified_;
};

}  // namespace

void Engine::save(const std::string& dir, const std::string& extra_json) {
  const nlohmann::json extra = parse_extra(extra_json);
  detail::Trainer& trainer = *trainer_;
  trainer.quiesce("save()");
  nlohmann::json state = trainer.checkpoint_state();
  state["extra"] = extra;
  state["base"] = base_identity(trainer.model(), trainer.parts(), trainer.config());
  state["world_size"] = detail::world_size(trainer.config());
  if (trainer.shards_states()) return write_rank_files(dir, trainer, state);
  // Note: the states are whole on every rank (one rank, or zo2's replicated states): rank 0
  // writes them in one file, which loads into any world size, each rank keeping its own shard of
  // what it reads. "even" is also what a consolidated checkpoint of several ranks recorded.
  state["shards"] = "even";
  rank_zero_writes(trainer, "save()", /*with_states=*/true, [&] {
    detail::write_checkpoint(dir, trainer.model(), trainer.parts(), trainer.config().optimizer.kind,
                             trainer.state_count(), state,
                             [&](std::size_t p) { return trainer.read_part(p, /*with_states=*/true); },
                             trainer.config().checkpoint_env);
  });
}

void Engine::export_pretrained(const std::string& dir, Precision precision,
                               const std::map<std::string, std::string>& extra_files) {
  FERRY_CHECK(model().config(), "export_pretrained('", dir, "'): the model has no Hugging Face config (a model ",
              "of your own modules); save() writes its weights under the parts' own names");
  const DType dtype = to_dtype(detail::scalar_type(precision));
  detail::Trainer& trainer = *trainer_;
  trainer.quiesce("export_pretrained()");
  rank_zero_writes(trainer, "export_pretrained()", /*with_states=*/false, [&] {
    const std::vector<detail::Part>& parts = trainer.parts();
    const models::ModelConfig& config = *trainer.model().config();
    const std::vector<detail::Part> merged = merged_parts(parts);
    detail::write_weights_directory(dir, trainer.model(), merged, dtype, {}, nlohmann::json(), extra_files, [&](std::size_t p) {
      const torch::Tensor trained = trainer.read_part(p, /*with_states=*/false).weights;
      const torch::Tensor frozen = trainer.read_frozen(p);
      std::map<std::string, torch::Tensor> named = named_values(parts[p], trained, frozen);
      if (parts[p].kind == models::Part::kBlock) {
        for (const models::LoraTarget& target : config.lora_targets()) {
          const std::string weight = target.module + ".weight";
          named[weight] = models::merge_lora(config, target, named.at(weight), named.at(target.module + ".lora_A.weight"),
                                             named.at(target.module + ".lora_B.weight"));
        }
      }
      torch::Tensor flat = torch::empty({merged[p].numel}, torch::kFloat);
      for (const detail::ParameterSlice& slice : merged[p].slices) {
        flat.narrow(0, slice.offset, slice.numel).copy_(named.at(slice.name).reshape({-1}));
      }
      return detail::PartValues{flat, {}};
    }, trainer.config().checkpoint_env);
  });
}

void Engine::export_adapter(const std::string& dir, const std::string& base_model_name_or_path) {
  FERRY_CHECK(model().config() && model().config()->lora.enabled(), "export_adapter('", dir,
              "'): the model has no LoRA adapters (ModelConfig::lora.rank is 0)");
  detail::Trainer& trainer = *trainer_;
  trainer.quiesce("export_adapter()");
  rank_zero_writes(trainer, "export_adapter()", /*with_states=*/false, [&] {
    const models::ModelConfig& config = *trainer.model().config();
    const std::vector<detail::Part>& parts = trainer.parts();
    Env& env = env_or_posix(trainer.config().checkpoint_env);
    const std::string staged = dir + ".partial";
    fs::remove_tree(staged);
    fs::make_directories(staged);

    std::vector<safetensors::TensorSpec> specs;
    for (const detail::Part& part : parts) {
      for (const detail::ParameterSlice& slice : part.slices) {
        specs.push_back({models::peft_name(config, part.index, slice.name), DType::kF32, slice.shape});
      }
    }
    safetensors::Writer adapters = safetensors::Writer::file(staged + "/adapter_model.safetensors", std::move(specs), {}, &env);
    for (std::size_t p = 0; p < parts.size(); ++p) {
      if (!parts[p].trainable()) continue;
      const torch::Tensor values = trainer.read_part(p, /*with_states=*/false).weights;
      for (const detail::ParameterSlice& slice : parts[p].slices) {
        adapters.write(models::peft_name(config, parts[p].index, slice.name), values.data_ptr<float>() + slice.offset,
                       static_cast<std::uint64_t>(slice.numel) * 4);
      }
    }
    adapters.finish();

    // The keys of PEFT's LoraConfig that say what the adapters are; PEFT takes its defaults for the rest.
    const nlohmann::json adapter_config = {
        {"peft_type", "LORA"},
        {"task_type", "CAUSAL_LM"},
        {"base_model_name_or_path", base_model_name_or_path},
        {"r", config.lora.rank},
        {"lora_alpha", config.lora.alpha},
        {"lora_dropout", config.lora.dropout},
        {"target_modules", peft_target_modules(config)},
        {"bias", "none"},
        {"fan_in_fan_out", config.family == models::Family::kGpt2},
        {"inference_mode", true},
        {"init_lora_weights", true},
        {"modules_to_save", nullptr},
        {"layers_to_transform", nullptr},
        {"layers_pattern", nullptr},
        {"rank_pattern", nlohmann::json::object()},
        {"alpha_pattern", nlohmann::json::object()},
        {"use_rslora", false},
        {"use_dora", false},
        {"revision", nullptr},
    };
    write_file_durably(env, staged + "/adapter_config.json", adapter_config.dump(2) + "\n");
    env.sync_directory(staged);
    swap_into_place(env, staged, dir);
  });
}

// Of a checkpoint in one file every rank reads the whole, whatever world size wrote it, and keeps
// its shard; of one in rank files, the weights and the elements of its own shards.
std::string Engine::load(const std::string& dir) {
  detail::Trainer& trainer = *trainer_;
  nlohmann::json state;
  detail::on_every_rank(trainer.config().communicator.get(), "load()", [&] {
    state = read_state(dir, config());
    check_base(dir, state, base_identity(trainer.model(), trainer.parts(), trainer.config()));
    trainer.quiesce("load()");
    if (state["format"] == kRankFilesFormat) return RankFilesReader(dir, trainer, state).load();
    detail::read_checkpoint(dir, trainer.model(), trainer.parts(), trainer.config().optimizer.kind,
                            trainer.state_count(), state.contains("checksums") ? state["checksums"] : nlohmann::json(),
                            trainer.config().verify,
                            [&](std::size_t p, detail::PartValues values) { trainer.write_part(p, values); });
  });
  trainer.restore_state(state);
  return state.contains("extra") ? state["extra"].dump() : "{}";
}

}  // namespace ferry
