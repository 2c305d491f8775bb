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

// A CPU fp32 tensor holding the values of `source` (which may live on a device).
torch::Tensor on_host(const torch::Tensor& source) {
  return source.device().is_cpu() ? source : source.to(torch::kCPU);
}

}  // namespace

void Engine::save(const std::string& dir, const std::string& extra_json) {
  Impl& impl = *impl_;
  FERRY_CHECK(!impl.pending && impl.micro_batches == 0, "save() in the middle of a step (",
              impl.micro_batches, " of ", impl.config.grad_accumulation,
              " micro-batches done): save after step()");
  nlohmann::json extra;
  try {
    extra = nlohmann::json::parse(extra_json);
  } catch (const nlohmann::json::exception& error) {
    throw Error(detail::concat("save(): extra state is not valid JSON: ", error.what()));
  }
  impl.wait_for_workers();
  impl.store->synchronize();

  const std::string staged = dir + ".partial";
  fs::remove_tree(staged);
  fs::make_directories(staged);

  std::vector<torch::Tensor> keep_alive;
  std::vector<safetensors::TensorView> weights, optimizer;
  const std::vector<std::string> states = state_names(impl.config.optimizer.kind);
  for (const detail::Part& part : impl.parts) {
    torch::Tensor master = on_host(impl.master_view(part));
    keep_alive.push_back(master);
    std::vector<torch::Tensor> state_tensors;
    for (BundleId state : part.states) {
      state_tensors.push_back(on_host(impl.view(state, impl.optimizer_tier, torch::kFloat, part.numel)));
      keep_alive.push_back(state_tensors.back());
    }
    for (const detail::ParameterSlice& slice : part.slices) {
      const std::string name = tensor_name(impl.model, part, slice);
      const std::uint64_t offset = static_cast<std::uint64_t>(slice.offset) * 4;
      weights.push_back({name, DType::kF32, slice.shape,
                         static_cast<const char*>(master.data_ptr()) + offset});
      for (std::size_t i = 0; i < state_tensors.size(); ++i) {
        optimizer.push_back({name + "." + states[i], DType::kF32, slice.shape,
                             static_cast<const char*>(state_tensors[i].data_ptr()) + offset});
      }
    }
  }
  safetensors::write_checkpoint(staged, weights, models::kDefaultMaxShardBytes);
  if (!optimizer.empty()) safetensors::write_file(staged + "/" + kOptimizerFile, optimizer);
  if (impl.model.config()) {
    models::ModelConfig config = *impl.model.config();
    config.dtype = DType::kF32;  // the weights are the fp32 master
    write_text_file(staged + "/config.json", config.to_hf_json());
  }
  nlohmann::json state = {
      {"format", kFormat},
      {"step", impl.steps},
      {"mode", to_string(impl.config.mode)},
      {"precision", to_string(impl.config.precision)},
      {"optimizer", to_string(impl.config.optimizer.kind)},
      {"loss_scale", impl.scaler.raw_scale()},
      {"loss_scale_clean_steps", impl.scaler.clean_steps()},
      {"extra", extra},
  };
  write_text_file(staged + "/" + kStateFile, state.dump(2));
  fsync_path(staged, true);
  swap_into_place(staged, dir);
}

std::string Engine::load(const std::string& dir) {
  Impl& impl = *impl_;
  FERRY_CHECK(!impl.pending && impl.micro_batches == 0, "load() in the middle of a step");
  FERRY_CHECK(fs::is_directory(dir), "checkpoint directory '", dir, "' does not exist");
  nlohmann::json state;
  try {
    state = nlohmann::json::parse(read_text_file(dir + "/" + kStateFile));
  } catch (const nlohmann::json::exception& error) {
    throw Error(detail::concat(dir, "/", kStateFile, " is not valid JSON: ", error.what()));
  }
  FERRY_CHECK(state.value("format", "") == kFormat, dir, "/", kStateFile, " has format '",
              state.value("format", ""), "'; this ferry reads '", kFormat, "'");
  FERRY_CHECK(state.value("optimizer", "") == to_string(impl.config.optimizer.kind), "checkpoint '",
              dir, "' holds ", state.value("optimizer", "?"), " state but the engine runs ",
              to_string(impl.config.optimizer.kind));
  impl.wait_for_workers();
  impl.store->synchronize();

  safetensors::Checkpoint weights(dir);
  const bool has_states = !impl.parts.front().states.empty();
  std::optional<safetensors::Reader> optimizer;
  if (has_states) optimizer.emplace(dir + "/" + kOptimizerFile);
  const std::vector<std::string> states = state_names(impl.config.optimizer.kind);

  // Read everything and check every shape before changing anything.
  struct Loaded {
    torch::Tensor master;
    std::vector<torch::Tensor> states;
  };
  std::vector<Loaded> loaded;
  for (const detail::Part& part : impl.parts) {
    Loaded values;
    values.master = torch::empty({part.numel}, torch::kFloat);
    for (std::size_t i = 0; i < part.states.size(); ++i) {
      values.states.push_back(torch::empty({part.numel}, torch::kFloat));
    }
    for (const detail::ParameterSlice& slice : part.slices) {
      const std::string name = tensor_name(impl.model, part, slice);
      FERRY_CHECK(weights.contains(name), "checkpoint '", dir, "' has no tensor '", name,
                  "': it was written for another model");
      const safetensors::TensorInfo& info = weights.tensor(name);
      FERRY_CHECK(info.shape == slice.shape && info.dtype == DType::kF32, "checkpoint '", dir,
                  "': tensor '", name, "' is ", dtype_name(info.dtype), " ",
                  torch::IntArrayRef(info.shape), " but the model has F32 ",
                  torch::IntArrayRef(slice.shape), ": it was written for another model");
      weights.read_into(name, values.master.data_ptr<float>() + slice.offset,
                        static_cast<std::uint64_t>(slice.numel) * 4);
      for (std::size_t i = 0; i < values.states.size(); ++i) {
        optimizer->read_into(name + "." + states[i], values.states[i].data_ptr<float>() + slice.offset,
                             static_cast<std::uint64_t>(slice.numel) * 4);
      }
    }
    loaded.push_back(std::move(values));
  }

  torch::NoGradGuard no_grad;
  for (std::size_t p = 0; p < impl.parts.size(); ++p) {
    const detail::Part& part = impl.parts[p];
    torch::Tensor master = impl.master_view(part);
    master.copy_(loaded[p].master);
    for (std::size_t i = 0; i < part.states.size(); ++i) {
      impl.view(part.states[i], impl.optimizer_tier, torch::kFloat, part.numel).copy_(loaded[p].states[i]);
    }
    if (part.master != detail::kNoBundle) {
      impl.view(part.params, impl.optimizer_tier, impl.compute_dtype, part.numel).copy_(master);
    }
    impl.store->mark_dirty(part.params, impl.optimizer_tier);
    if (impl.offloaded()) {
      impl.uploads[p] = impl.store->write_back(part.params, Tier::kHost, Tier::kGpu);
    }
  }
  impl.steps = state.value("step", std::int64_t{0});
  impl.stats.steps = impl.steps;
  impl.scaler.restore(state.value("loss_scale", impl.scaler.raw_scale()),
                      state.value("loss_scale_clean_steps", std::int64_t{0}));
  return state.contains("extra") ? state["extra"].dump() : "{}";
}

}  // namespace ferry
