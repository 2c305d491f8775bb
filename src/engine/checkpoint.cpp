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
#include <optional>
#include <random>
#include <set>
#include <sstream>

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

void Engine::save(const std::string& dir, const std::string& extra_json) {
  const nlohmann::json extra = parse_extra(extra_json);
  detail::Trainer& trainer = *trainer_;
  trainer.quiesce("save()");
  nlohmann::json state = trainer.checkpoint_state();
  state["extra"] = extra;
  detail::write_checkpoint(dir, trainer.model(), trainer.parts(), trainer.config().optimizer.kind,
                           trainer.state_count(), state,
                           [&](std::size_t p) { return trainer.read_part(p, /*with_states=*/true); },
                           trainer.config().checkpoint_env);
}

void Engine::export_pretrained(const std::string& dir, Precision precision,
                               const std::map<std::string, std::string>& extra_files) {
  FERRY_CHECK(model().config(), "export_pretrained('", dir, "'): the model has no Hugging Face config (a model ",
              "of your own modules); save() writes its weights under the parts' own names");
  const DType dtype = to_dtype(detail::scalar_type(precision));
  detail::Trainer& trainer = *trainer_;
  trainer.quiesce("export_pretrained()");
  detail::write_weights_directory(dir, trainer.model(), trainer.parts(), dtype, {}, nlohmann::json(), extra_files,
                                  [&](std::size_t p) { return trainer.read_part(p, /*with_states=*/false); },
                                  trainer.config().checkpoint_env);
}

std::string Engine::load(const std::string& dir) {
  const nlohmann::json state = read_state(dir, config());
  detail::Trainer& trainer = *trainer_;
  trainer.quiesce("load()");
  detail::read_checkpoint(dir, trainer.model(), trainer.parts(), trainer.config().optimizer.kind,
                          trainer.state_count(), state.contains("checksums") ? state["checksums"] : nlohmann::json(),
                          trainer.config().verify,
                          [&](std::size_t p, detail::PartValues values) { trainer.write_part(p, values); });
  trainer.restore_state(state);
  return state.contains("extra") ? state["extra"].dump() : "{}";
}

}  // namespace ferry
