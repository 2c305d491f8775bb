// Loads a Hugging Face model directory with ferry, runs tokens through it and writes the logits,
// for tools/hf_compare.py to compare against transformers.
//
//   example_hf_logits MODEL_DIR TOKENS.safetensors OUT.safetensors
//                     [--dtype float32|bfloat16|float16] [--device cpu|cuda] [--save DIR]
//
// TOKENS holds "tokens" (I64 [batch, seq]); OUT gets "logits" (F32 [batch, seq, vocab]). With
// --save, the loaded model is also written back with save_pretrained.

#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include <torch/torch.h>

#include "ferry/model.h"
#include "ferry/safetensors.h"

namespace {

ferry::DType parse_dtype_flag(const std::string& name) {
  if (name == "bfloat16") return ferry::DType::kBF16;
  if (name == "float16") return ferry::DType::kF16;
  if (name == "float32") return ferry::DType::kF32;
  throw std::runtime_error("--dtype must be float32, bfloat16 or float16, got " + name);
}

torch::Tensor read_tokens(const std::string& path) {
  ferry::safetensors::Reader reader(path);
  const auto& info = reader.tensor("tokens");
  if (info.dtype != ferry::DType::kI64 || info.shape.size() != 2) {
    throw std::runtime_error(path + ": 'tokens' must be I64 [batch, seq]");
  }
  torch::Tensor tokens = torch::empty(info.shape, torch::kLong);
  reader.read_into("tokens", tokens.data_ptr(), info.bytes());
  return tokens;
}

int run(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr,
                 "usage: %s MODEL_DIR TOKENS.safetensors OUT.safetensors [--dtype D] "
                 "[--device cpu|cuda] [--save DIR]\n",
                 argv[0]);
    return 2;
  }
  ferry::models::LoadOptions options;
  std::string device = "cpu", save_dir;
  for (int i = 4; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--dtype") {
      options.dtype = parse_dtype_flag(value);
    } else if (flag == "--device") {
      device = value;
    } else if (flag == "--save") {
      save_dir = value;
    } else {
      throw std::runtime_error("unknown flag " + flag);
    }
  }

  ferry::LayeredModel model = ferry::models::from_pretrained(argv[1], options);
  model.to(torch::Device(device));
  model.train(false);
  torch::NoGradGuard no_grad;
  torch::Tensor logits =
      model.forward(read_tokens(argv[2]).to(torch::Device(device))).to(torch::kCPU, torch::kFloat).contiguous();
  ferry::safetensors::write_file(
      argv[3], {{"logits", ferry::DType::kF32, logits.sizes().vec(), logits.data_ptr()}});
  if (!save_dir.empty()) {
    ferry::models::save_pretrained(model, save_dir);
  }
  std::printf("%s: %lld parameters, logits %s\n", argv[1],
              static_cast<long long>(model.parameter_count()),
              c10::str(logits.sizes()).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "error: %s\n", error.what());
    return 1;
  }
}
