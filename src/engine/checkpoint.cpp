// Engine checkpoints: weights as safetensors under Hugging Face names (with config.json, so
// transformers loads the directory), the optimizer state in the layout of torch's optimizers,
// and trainer_state.json. Written into a temporary directory, fsynced, then swapped in
// atomically, so a crash mid-save leaves the previous checkpoint intact.

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "engine/engine_impl.h"
#include "engine/zo2.h"
#include "ferry/check.h"
#include "ferry/safetensors.h"
#include "ferry/fs.h"

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

void fsync_path(const std::string& path, bool directory) {
  int fd = ::open(path.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  FERRY_CHECK(fd >= 0, "cannot open '", path, "' to fsync it: ", std::strerror(errno));
  int result = ::fsync(fd);
  int error = errno;
  ::close(fd);
  FERRY_CHECK(result == 0, "fsync of '", path, "' failed: ", std::strerror(error));
}

void write_text_file(const std::string& path, const std::string& text) {
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << text;
    FERRY_CHECK(out.good(), "cannot write '", path, "'");
  }
  fsync_path(path, false);
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
void swap_into_place(const std::string& staged, const std::string& target) {
  if (!fs::exists(target)) {
    FERRY_CHECK(::rename(staged.c_str(), target.c_str()) == 0, "cannot rename '", staged, "' to '",
                target, "': ", std::strerror(errno));
  } else {
    long result = ::syscall(SYS_renameat2, AT_FDCWD, staged.c_str(), AT_FDCWD, target.c_str(),
                            RENAME_EXCHANGE);
    FERRY_CHECK(result == 0, "cannot swap '", staged, "' into '", target, "': ",
                std::strerror(errno));
    fs::remove_tree(staged);  // now the previous checkpoint
  }
  fsync_path(fs::parent_directory(target), true);
}

// One part's fp32 weights and optimizer states, on the host, as a checkpoint holds them.
struct PartValues {
  torch::Tensor weights;
  std::vector<torch::Tensor> states;
};

nlohmann::json parse_extra(const std::string& extra_json) {
  try {
    return nlohmann::json::parse(extra_json);
  } catch (const nlohmann::json::exception& error) {
    throw Error(detail::concat("save(): extra state is not valid JSON: ", error.what()));
  }
}

// Writes `dir` atomically: weights, optimizer states, config.json and trainer_state.json.
void write_checkpoint(const std::string& dir, const LayeredModel& model,
                      const std::vector<detail::Part>& parts, const std::vector<PartValues>& values,
                      OptimizerKind kind, const nlohmann::json& state) {
  const std::string staged = dir + ".partial";
  fs::remove_tree(staged);
  fs::make_directories(staged);

  std::vector<safetensors::TensorView> weights, optimizer;
  const std::vector<std::string> states = state_names(kind);
  for (std::size_t p = 0; p < parts.size(); ++p) {
    const detail::Part& part = parts[p];
    for (const detail::ParameterSlice& slice : part.slices) {
      const std::string name = tensor_name(model, part, slice);
      const std::uint64_t offset = static_cast<std::uint64_t>(slice.offset) * 4;
      weights.push_back({name, DType::kF32, slice.shape,
                         static_cast<const char*>(values[p].weights.data_ptr()) + offset});
      for (std::size_t i = 0; i < values[p].states.size(); ++i) {
        optimizer.push_back({name + "." + states[i], DType::kF32, slice.shape,
                             static_cast<const char*>(values[p].states[i].data_ptr()) + offset});
      }
    }
  }
  safetensors::write_checkpoint(staged, weights, models::kDefaultMaxShardBytes);
  if (!optimizer.empty()) safetensors::write_file(staged + "/" + kOptimizerFile, optimizer);
  if (model.config()) {
    models::ModelConfig config = *model.config();
    config.dtype = DType::kF32;  // the weights are written in fp32
    write_text_file(staged + "/config.json", config.to_hf_json());
  }
  nlohmann::json full = state;
  full["format"] = kFormat;
  full["optimizer"] = to_string(kind);
  write_text_file(staged + "/" + kStateFile, full.dump(2));
  fsync_path(staged, true);
  swap_into_place(staged, dir);
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

// Reads every part's values and checks every shape before the caller changes anything.
std::vector<PartValues> read_values(const std::string& dir, const LayeredModel& model,
                                    const std::vector<detail::Part>& parts, OptimizerKind kind,
                                    std::size_t state_count) {
  safetensors::Checkpoint weights(dir);
  std::optional<safetensors::Reader> optimizer;
  if (state_count > 0) optimizer.emplace(dir + "/" + kOptimizerFile);
  const std::vector<std::string> states = state_names(kind);
  std::vector<PartValues> loaded;
  for (const detail::Part& part : parts) {
    PartValues values;
    values.weights = torch::empty({part.numel}, torch::kFloat);
    for (std::size_t i = 0; i < state_count; ++i) {
      values.states.push_back(torch::empty({part.numel}, torch::kFloat));
    }
    for (const detail::ParameterSlice& slice : part.slices) {
      const std::string name = tensor_name(model, part, slice);
      FERRY_CHECK(weights.contains(name), "checkpoint '", dir, "' has no tensor '", name,
                  "': it was written for another model");
      const safetensors::TensorInfo& info = weights.tensor(name);
      FERRY_CHECK(info.shape == slice.shape && info.dtype == DType::kF32, "checkpoint '", dir,
                  "': tensor '", name, "' is ", dtype_name(info.dtype), " ",
                  torch::IntArrayRef(info.shape), " but the model has F32 ",
                  torch::IntArrayRef(slice.shape), ": it was written for another model");
      weights.read_into(name, values.weights.data_ptr<float>() + slice.offset,
                        static_cast<std::uint64_t>(slice.numel) * 4);
      for (std::size_t i = 0; i < values.states.size(); ++i) {
        optimizer->read_into(name + "." + states[i], values.states[i].data_ptr<float>() + slice.offset,
                             static_cast<std::uint64_t>(slice.numel) * 4);
      }
    }
    loaded.push_back(std::move(values));
  }
  return loaded;
}

}  // namespace

void Engine::save(const std::string& dir, const std::string& extra_json) {
  const nlohmann::json extra = parse_extra(extra_json);
  if (zo2_) {
    Zo2& zo2 = *zo2_;
    zo2.flush();
    std::vector<PartValues> values;
    for (std::size_t p = 0; p < zo2.parts.size(); ++p) {
      values.push_back({zo2.read_weights(p), zo2.read_states(p)});
    }
    nlohmann::json state = {{"step", zo2.steps},
                            {"mode", to_string(Mode::kZo2)},
                            {"zo_seed", zo2.config.zo.seed},
                            {"zo_updates", zo2.update_count},
                            {"extra", extra}};
    write_checkpoint(dir, zo2.model, zo2.parts, values, zo2.config.optimizer.kind, state);
    return;
  }
  Impl& impl = *impl_;
  FERRY_CHECK(!impl.pending && impl.micro_batches == 0 && impl.buffered.empty(), "save() in the middle of a step (",
              impl.micro_batches, " of ", impl.config.grad_accumulation,
              " micro-batches done): save after step()");
  impl.wait_for_workers();
  impl.store->synchronize();
  std::vector<PartValues> values;
  for (const detail::Part& part : impl.parts) {
    PartValues part_values{impl.read_bundle(impl.master_bundle(part), torch::kFloat, part.numel), {}};
    for (BundleId state : part.states) {
      part_values.states.push_back(impl.read_bundle(state, torch::kFloat, part.numel));
    }
    values.push_back(std::move(part_values));
  }
  nlohmann::json state = {
      {"step", impl.steps},
      {"mode", to_string(impl.config.mode)},
      {"precision", to_string(impl.config.precision)},
      {"loss_scale", impl.scaler.raw_scale()},
      {"loss_scale_clean_steps", impl.scaler.clean_steps()},
      {"extra", extra},
  };
  write_checkpoint(dir, impl.model, impl.parts, values, impl.config.optimizer.kind, state);
}

std::string Engine::load(const std::string& dir) {
  const nlohmann::json state = read_state(dir, config());
  if (zo2_) {
    Zo2& zo2 = *zo2_;
    zo2.flush();
    std::vector<PartValues> loaded =
        read_values(dir, zo2.model, zo2.parts, zo2.config.optimizer.kind, zo2.bundles.front().states.size());
    for (std::size_t p = 0; p < zo2.parts.size(); ++p) {
      zo2.write_part(p, loaded[p].weights.to(zo2.storage_dtype), loaded[p].states);
    }
    zo2.steps = state.value("step", std::int64_t{0});
    zo2.stats.steps = zo2.steps;
    // Adam's bias corrections count the updates made so far.
    zo2.update_count = state.value("zo_updates", zo2.steps);
    zo2.home_updates.assign(zo2.parts.size(), zo2.update_count);
    return state.contains("extra") ? state["extra"].dump() : "{}";
  }
  Impl& impl = *impl_;
  FERRY_CHECK(!impl.pending && impl.micro_batches == 0 && impl.buffered.empty(), "load() in the middle of a step");
  impl.wait_for_workers();
  impl.store->synchronize();
  std::vector<PartValues> loaded =
      read_values(dir, impl.model, impl.parts, impl.config.optimizer.kind, impl.parts.front().states.size());

  for (std::size_t p = 0; p < impl.parts.size(); ++p) {
    const detail::Part& part = impl.parts[p];
    impl.write_bundle(p, impl.master_bundle(part), loaded[p].weights);
    for (std::size_t i = 0; i < part.states.size(); ++i) impl.write_bundle(p, part.states[i], loaded[p].states[i]);
    if (part.master != detail::kNoBundle) {
      impl.write_bundle(p, part.params, loaded[p].weights.to(impl.compute_dtype));
    }
  }
  impl.steps = state.value("step", std::int64_t{0});
  impl.stats.steps = impl.steps;
  impl.scaler.restore(state.value("loss_scale", impl.scaler.raw_scale()),
                      state.value("loss_scale_clean_steps", std::int64_t{0}));
  return state.contains("extra") ? state["extra"].dump() : "{}";
}

}  // namespace ferry
