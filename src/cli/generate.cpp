// `ferry generate`: text from a Hugging Face model directory or a ferry checkpoint, with the
// model's tokenizer, greedy or sampled (temperature, top-k, top-p), stopping at EOS, with the chat
// template applied when asked.

#include <cstdio>
#include <cxxopts.hpp>
#include <fstream>
#include <iostream>
#include <limits>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "ferry/check.h"
#include "ferry/engine.h"
#include "ferry/fs.h"
#include "ferry/job.h"
#include "ferry/model.h"
#include "ferry/tokenizer.h"

namespace ferry::cli {
namespace {

using Json = nlohmann::json;

Json read_json(const std::string& path) {
  std::ifstream file(path);
  if (!file.is_open()) return Json::object();
  std::stringstream text;
  text << file.rdbuf();
  Json json = Json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  return json.is_object() ? json : Json::object();
}

// Where the model's tokenizer is: the directory itself, or, for a checkpoint of a `ferry finetune`
// run (OUT/checkpoints/step-N), the model directory the run's OUT/config.json names.
std::string find_tokenizer(const std::string& model) {
  if (has_tokenizer(model)) return model;
  const std::string run_config = model + "/../../config.json";
  const Json job = read_json(run_config);
  for (const char* key : {"tokenizer", "model"}) {
    if (job.contains(key) && job[key].is_string() && fs::is_directory(job[key].get<std::string>()) &&
        has_tokenizer(job[key].get<std::string>())) {
      return job[key].get<std::string>();
    }
  }
  FERRY_CHECK(false, "no tokenizer for ", model, ": looked for tokenizer.json and tokenizer.model in it, and for the ",
              "model directory named by ", run_config, "; give --tokenizer PATH");
  return "";
}

int run_generate(int argc, char** argv) {
  cxxopts::Options options(argv[0], "Generate text with a model: a Hugging Face directory or a ferry checkpoint "
                                    "(its run's model directory gives the tokenizer). Greedy by default, or as the "
                                    "model's generation_config.json says (do_sample, temperature, top_k, top_p); the "
                                    "flags override it. Stops at EOS (generation_config.json's eos_token_id, and with "
                                    "--chat the template's end-of-turn token). Prints the new text.");
  options.add_options()("model", "a Hugging Face model directory or a ferry checkpoint", cxxopts::value<std::string>())(
      "tokenizer", "a directory or file with the tokenizer (default: found from --model)", cxxopts::value<std::string>())(
      "prompt", "the prompt text", cxxopts::value<std::string>())(
      "chat", "render the prompt as a user message with the chat template, and a generation prompt after it")(
      "system", "with --chat: a system message first", cxxopts::value<std::string>())(
      "template", "with --chat: the chat template (default: the model's own, else plain)",
      cxxopts::value<std::string>()->default_value(""))(
      "max-new-tokens", "at most this many new tokens (default: generation_config.json's, else 128)",
      cxxopts::value<std::string>())("greedy", "always the most likely token")(
      "temperature", "sampling temperature, 0 or more; 0 is greedy", cxxopts::value<std::string>())(
      "top-p", "nucleus sampling: the smallest set of tokens with this much probability, in (0, 1]",
      cxxopts::value<std::string>())(
      "top-k", "sample among the k most likely tokens (0: all)", cxxopts::value<std::string>())(
      "seed", "the sampling seed, 0 or more", cxxopts::value<std::string>()->default_value("0"))(
      "mode", "gpu, zero-offload, fuyou or zo2 (a model larger than the GPU streams through it)",
      cxxopts::value<std::string>()->default_value("gpu"))(
      "device", "auto, cpu, cuda or cuda:N", cxxopts::value<std::string>()->default_value("auto"))(
      "precision", "fp32, bf16, fp16, or auto (the checkpoint's dtype on a GPU, fp32 on the CPU)",
      cxxopts::value<std::string>()->default_value("auto"))(
      "gpu-budget", "bytes or 24GiB; 0: no limit", cxxopts::value<std::string>()->default_value("0"))(
      "host-budget", "bytes or 64GiB; 0: no limit", cxxopts::value<std::string>()->default_value("0"))(
      "h,help", "show this help");
  auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    return 0;
  }
  FERRY_CHECK(args.count("model") && args.count("prompt"), "ferry generate needs --model and --prompt");
  const std::string model_path = args["model"].as<std::string>();
  FERRY_CHECK(fs::is_directory(model_path), "model directory '", model_path, "' does not exist: give a Hugging Face ",
              "model directory or a ferry checkpoint");
  const auto tokenizer =
      load_tokenizer(args.count("tokenizer") ? args["tokenizer"].as<std::string>() : find_tokenizer(model_path));
  const TokenizerInfo& info = tokenizer->info();

  std::vector<std::int64_t> prompt;
  std::vector<std::int64_t> stop_ids = info.stop_ids;
  const std::string text = args["prompt"].as<std::string>();
  if (args.count("chat")) {
    const ChatTemplate chat = ChatTemplate::for_tokenizer(*tokenizer, args["template"].as<std::string>());
    std::vector<ChatMessage> messages;
    if (args.count("system")) messages.push_back({"system", args["system"].as<std::string>()});
    messages.push_back({"user", text});
    prompt = tokenizer->encode(chat.render(messages, info, /*add_generation_prompt=*/true).text);
    if (const auto end = tokenizer->token_to_id(chat.end_of_turn()); end && !chat.end_of_turn().empty()) {
      stop_ids.push_back(*end);
    }
  } else {
    prompt = tokenizer->encode_with_special_tokens(text);
  }
  FERRY_CHECK(!prompt.empty(), "the prompt has no tokens");

  // Sampling: generation_config.json's, then the flags.
  const Json generation = read_json(model_path + "/generation_config.json");
  GenerationOptions sampling;
  sampling.stop_ids = stop_ids;
  sampling.vocab_size = tokenizer->vocab_size();
  sampling.seed = static_cast<std::uint64_t>(
      parse_integer(args["seed"].as<std::string>(), "--seed", 0, std::numeric_limits<std::int64_t>::max()));
  sampling.max_new_tokens = generation.value("max_new_tokens", std::int64_t{128});
  if (generation.value("do_sample", false)) {
    sampling.temperature = generation.value("temperature", 1.0);
    sampling.top_p = generation.value("top_p", 1.0);
    sampling.top_k = generation.value("top_k", std::int64_t{50});
  }
  auto flag_text = [&](const char* flag) { return args[flag].as<std::string>(); };
  if (args.count("max-new-tokens")) {
    sampling.max_new_tokens = parse_integer(flag_text("max-new-tokens"), "--max-new-tokens", 1, std::int64_t{1} << 30);
  }
  if (args.count("temperature")) sampling.temperature = parse_number(flag_text("temperature"), "--temperature");
  if (args.count("top-p")) sampling.top_p = parse_number(flag_text("top-p"), "--top-p");
  if (args.count("top-k")) sampling.top_k = parse_integer(flag_text("top-k"), "--top-k", 0, std::int64_t{1} << 30);
  if (args.count("greedy")) sampling.temperature = 0;

  LayeredModel model = models::from_pretrained(model_path);
  FERRY_CHECK(tokenizer->vocab_size() <= model.config()->vocab_size, "the tokenizer has ", tokenizer->vocab_size(),
              " ids but the model's vocabulary is ", model.config()->vocab_size, ": give the model's own tokenizer");
  Json settings = {{"mode", args["mode"].as<std::string>()},
                   {"device", args["device"].as<std::string>()},
                   {"gpu_budget", args["gpu-budget"].as<std::string>()},
                   {"host_budget", args["host-budget"].as<std::string>()}};
  EngineConfig probe = engine_config_from_json(settings.dump());
  std::string precision = args["precision"].as<std::string>();
  if (precision == "auto") {
    const DType dtype = model.config()->dtype;
    precision = !probe.device.is_cuda() ? "fp32" : dtype == DType::kBF16 ? "bf16" : dtype == DType::kF16 ? "fp16" : "fp32";
  }
  settings["precision"] = precision;
  Engine engine(std::move(model), engine_config_from_json(settings.dump()));
  const std::vector<std::int64_t> generated = generate(engine, prompt, sampling);
  std::cout << tokenizer->decode(generated, /*skip_special_tokens=*/true) << "\n";
  std::fprintf(stderr, "generate: %zu prompt tokens, %zu new (%s), %s\n", prompt.size(), generated.size(),
               static_cast<std::int64_t>(generated.size()) < sampling.max_new_tokens ? "stopped at EOS" : "the limit",
               sampling.temperature > 0 ? "sampled" : "greedy");
  return 0;
}

}  // namespace

FERRY_CLI_COMMAND("generate", "text from a model or a checkpoint, with its own tokenizer", run_generate);

}  // namespace ferry::cli
