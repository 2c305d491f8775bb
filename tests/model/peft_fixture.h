#pragma once

// PEFT's LoRA fixture: tests/model/fixtures/peft in the source tree, made by tools/peft_fixtures.py
// on a machine with peft and transformers: base/ (a tiny llama), all-linear/ and q-v/ (PEFT's
// save_pretrained), merged/ (merge_and_unload of all-linear), reference.safetensors (input_ids and
// the logits of the base, the adapter and the merged model).

#include <unistd.h>

#include <climits>
#include <fstream>
#include <set>
#include <string>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "ferry/fs.h"
#include "ferry/model.h"
#include "ferry/safetensors.h"

namespace ferry::testing {

// Note: __FILE__ is relative to the build directory when the build names sources that way (Ninja
// does), and the test binary lives in <build>/tests, so a relative path is resolved from there.
inline std::string peft_fixture() {
  const std::string file = __FILE__;
  const std::string directory = file.substr(0, file.rfind('/')) + "/fixtures/peft";
  if (!directory.empty() && directory[0] == '/') return directory;
  char executable[PATH_MAX] = {};
  const ssize_t length = readlink("/proc/self/exe", executable, sizeof executable - 1);
  const std::string exe(executable, length > 0 ? static_cast<std::size_t>(length) : 0);
  return exe.substr(0, exe.rfind('/')) + "/../" + directory;
}

// Whether the fixture is there; the tests that compare with PEFT say so when it is not.
inline bool have_peft_fixture() { return fs::exists(peft_fixture() + "/reference.safetensors"); }

// One tensor of a safetensors file, in its own dtype.
inline torch::Tensor read_tensor(const safetensors::Reader& reader, const std::string& name) {
  const safetensors::TensorInfo& info = reader.tensor(name);
  torch::Tensor values = torch::empty(info.shape, to_scalar_type(info.dtype));
  reader.read_into(name, values.data_ptr(), info.bytes());
  return values;
}

// PEFT's target_modules as the last names of the modules (PEFT 0.21 writes "all-linear" expanded
// to every module's full name).
inline std::set<std::string> peft_targets(const nlohmann::json& adapter_config) {
  std::set<std::string> names;
  for (const std::string& name : adapter_config.at("target_modules").get<std::vector<std::string>>()) {
    names.insert(name.substr(name.rfind('.') + 1));
  }
  return names;
}

// The fixture's base with the adapters of `adapter` ("all-linear", "q-v") as PEFT saved them.
inline LayeredModel load_peft_model(const std::string& adapter) {
  const std::string dir = peft_fixture() + "/" + adapter;
  nlohmann::json config;
  std::ifstream(dir + "/adapter_config.json") >> config;
  models::LoadOptions options;
  options.lora.rank = config.at("r");
  options.lora.alpha = config.at("lora_alpha");
  const std::set<std::string> targets = peft_targets(config);
  options.lora.targets.assign(targets.begin(), targets.end());
  LayeredModel model = models::from_pretrained(peft_fixture() + "/base", options);
  safetensors::Reader adapters(dir + "/adapter_model.safetensors");
  torch::NoGradGuard no_grad;
  for (std::size_t i = 0; i < model.num_blocks(); ++i) {
    for (const auto& item : model.blocks()[i]->named_parameters()) {
      if (item.key().find(".lora_") == std::string::npos) continue;
      item.value().copy_(read_tensor(adapters, models::peft_name(*model.config(), static_cast<std::int64_t>(i), item.key())));
    }
  }
  return model;
}

}  // namespace ferry::testing
