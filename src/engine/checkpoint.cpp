// Engine checkpoints: weights as safetensors under Hugging Face names (with config.json, so
// transformers loads the directory), the optimizer state in the layout of torch's optimizers,
// and trainer_state.json with every tensor's XXH64. Written through the Env into a temporary
// directory, every file fsynced, then swapped in atomically, so a failure or a crash mid-save
// leaves the previous checkpoint intact. Saving and loading go one part at a time through the
// strategies' per-part readers and writers; loading checks what it reads against the checksums.

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
  FERRY_CHECK(state.value("format", "") == kFormat, dir, "/", kStateFile, " has format '",
              state.value("format", ""), "'; this ferry reads '", kFormat, "'");
  FERRY_CHECK(state.value("optimizer", "") == to_string(config.optimizer.kind), "checkpoint '",
              dir, "' holds ", state.value("optimizer", "?"), " state but the engine runs ",
              to_string(config.optimizer.kind));
  const bool saved_zo2 = state.value("mode", "") == to_string(Mode::kZo2);
  FERRY_CHECK(saved_zo2 == (config.mode == Mode::kZo2), "checkpoint '", dir, "' was written in ",
              state.value("mode", "?"), " mode, whose optimizer state means something else in ",
              to_string(config.mode), " mode");
  return state;
}

const float* part_data(const torch::Tensor& values, const detail::Part& part, const char* what) {
  FERRY_ASSERT(values.device().is_cpu() && values.scalar_type() == torch::kFloat &&
                   values.is_contiguous() && values.numel() == part.numel,
               part.name, "'s ", what, " must be ", part.numel, " contiguous fp32 values on the host");
  return values.data_ptr<float>();
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

  if (model.config()) {
    models::ModelConfig config = *model.config();
    config.dtype = weight_dtype;
    write_file_durably(env, staged + "/config.json", config.to_hf_json());
  }
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
    std::string sum;
    if (!checksums.is_null()) {
      const nlohmann::json& files = checksums.at("files");
      FERRY_CHECK(files.contains(file) && files[file].contains(name), "checkpoint '", dir, "': trainer_state.json ",
                  "records no checksum for tensor '", name, "' in ", file, ": the checkpoint is damaged; load ",
                  "another one (or this one with verify none, at your own risk)");
      sum = files[file][name].get<std::string>();
    }
    recorded[name] = {file, sum};
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
    const std::string read = hex(xxh64(data, bytes));
    FERRY_CHECK(read == sum, "checkpoint '", dir, "' is corrupt: tensor '", name, "' in ", file,
                " does not match the checksum recorded when it was saved (xxh64 ", sum, " recorded, ", read,
                " read): the file was changed or damaged on disk. Load an earlier checkpoint, or this one with ",
                "verify none to read it anyway");
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
    if (!trainer.reads_collectively()) return;
    for (std::size_t p = 0; p < trainer.parts().size(); ++p) {
      if (trainer.parts()[p].trainable()) trainer.read_part(p, with_states);
    }
  });
}

}  // namespace

void Engine::save(const std::string& dir, const std::string& extra_json) {
  const nlohmann::json extra = parse_extra(extra_json);
  detail::Trainer& trainer = *trainer_;
  trainer.quiesce("save()");
  nlohmann::json state = trainer.checkpoint_state();
  state["extra"] = extra;
  state["base"] = base_identity(trainer.model(), trainer.parts(), trainer.config());
  state["world_size"] = detail::world_size(trainer.config());
  // Note: the checkpoint holds every part's whole optimizer state, gathered from the ranks'
  // shards ("shards" records how they were split), so it loads into any world size: each rank
  // keeps its own shard of what it reads (re-sharding on load).
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

// Every rank reads the whole checkpoint, whatever world size wrote it, and keeps its shard.
std::string Engine::load(const std::string& dir) {
  detail::Trainer& trainer = *trainer_;
  nlohmann::json state;
  detail::on_every_rank(trainer.config().communicator.get(), "load()", [&] {
    state = read_state(dir, config());
    check_base(dir, state, base_identity(trainer.model(), trainer.parts(), trainer.config()));
    trainer.quiesce("load()");
    detail::read_checkpoint(dir, trainer.model(), trainer.parts(), trainer.config().optimizer.kind,
                            trainer.state_count(), state.contains("checksums") ? state["checksums"] : nlohmann::json(),
                            trainer.config().verify,
                            [&](std::size_t p, detail::PartValues values) { trainer.write_part(p, values); });
  });
  trainer.restore_state(state);
  return state.contains("extra") ? state["extra"].dump() : "{}";
}

}  // namespace ferry
