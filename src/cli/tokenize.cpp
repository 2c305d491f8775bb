// `ferry tokenize`: a model's tokenizer on one text (the ids as a JSON array on the last line of
// stdout, as Hugging Face's encode(text, add_special_tokens=False) gives them), or a whole dataset
// pre-tokenized on every core into a token file (.bin) for `ferry finetune`.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cxxopts.hpp>
#include <fstream>
#include <iostream>
#include <string>

#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "ferry/check.h"
#include "ferry/data.h"
#include "ferry/io.h"
#include "ferry/job.h"
#include "ferry/tokenizer.h"

namespace ferry::cli {
namespace {

using Json = nlohmann::json;

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Every example's tokens one after another, little-endian, in the file's dtype; written next to
// the destination and renamed over it, so a reader never sees half a file.
std::int64_t write_token_file(const data::Dataset& dataset, const std::string& path, std::int64_t vocab_size) {
  const data::TokenDtype dtype = data::token_dtype_from_path(path);
  const int bytes = dtype == data::TokenDtype::kUint16 ? 2 : 4;
  FERRY_CHECK(dtype == data::TokenDtype::kUint32 || vocab_size <= 65536, "the tokenizer has ", vocab_size,
              " ids, more than uint16 holds: name the output *.u32.bin (uint32 tokens) instead of ", path);
  DurableFile file(Env::posix(), path);
  std::int64_t tokens = 0;
  std::string buffer;
  for (std::int64_t i = 0; i < dataset.size(); ++i) {
    buffer.clear();
    for (std::int64_t id : dataset.get(i).tokens) {
      for (int b = 0; b < bytes; ++b) buffer.push_back(static_cast<char>((id >> (8 * b)) & 0xFF));
    }
    file.append(buffer.data(), buffer.size());
    tokens += static_cast<std::int64_t>(buffer.size()) / bytes;
  }
  file.commit();
  return tokens;
}

int run_tokenize(int argc, char** argv) {
  cxxopts::Options options(argv[0], "Tokenize with a model's own tokenizer. With --text: prints the ids as a JSON "
                                    "array on the last line of stdout (no BOS or EOS added; added and special tokens "
                                    "in the text are recognised), as Hugging Face's encode(text, "
                                    "add_special_tokens=False) or SentencePiece's encode(text) gives them. With --data "
                                    "and --out: tokenizes a dataset (any format ferry finetune reads) on every core "
                                    "into a token file (*.bin uint16, *.u32.bin uint32), each example as finetune "
                                    "would make it (BOS, text, EOS; chat templates applied).");
  options.add_options()("model", "a model directory, or a directory or file holding tokenizer.json or tokenizer.model",
                        cxxopts::value<std::string>())("text", "the text to tokenize", cxxopts::value<std::string>())(
      "special-tokens", "with --text: add the special tokens the tokenizer adds (transformers' tokenizer(text))")(
      "tokens", "with --text: print the tokens' strings as a JSON array first")(
      "data", "a dataset to tokenize (.jsonl, .json or text)", cxxopts::value<std::string>())(
      "out", "the token file to write (*.bin or *.u32.bin)", cxxopts::value<std::string>())(
      "data-format", "auto, text, prompt-completion, alpaca, messages or sharegpt",
      cxxopts::value<std::string>()->default_value("auto"))(
      "template", "the chat template for conversations (default: the model's own, else plain)",
      cxxopts::value<std::string>()->default_value(""))(
      "show", "with --data: print the first N examples (0 or more) as JSON lines of tokens and learned flags",
      cxxopts::value<std::string>()->default_value("0"))("h,help", "show this help");
  auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    return 0;
  }
  FERRY_CHECK(args.count("model"), "ferry tokenize needs --model (a model directory, tokenizer.json or tokenizer.model)");
  const auto tokenizer = load_tokenizer(args["model"].as<std::string>());
  FERRY_CHECK(args.count("text") != args.count("data"), "give --text TEXT, or --data FILE (with --out FILE.bin)");

  if (args.count("text")) {
    const std::string text = args["text"].as<std::string>();
    const std::vector<std::int64_t> ids =
        args.count("special-tokens") ? tokenizer->encode_with_special_tokens(text) : tokenizer->encode(text);
    if (args.count("tokens")) {
      Json tokens = Json::array();
      for (std::int64_t id : ids) tokens.push_back(tokenizer->id_to_token(id));
      std::cout << tokens.dump(-1, ' ', false, Json::error_handler_t::replace) << "\n";
    }
    std::cout << Json(ids).dump() << "\n";
    return 0;
  }

  data::TextOptions text_options;
  text_options.tokenizer = tokenizer;
  text_options.format = data::parse_data_format(args["data-format"].as<std::string>());
  text_options.chat_template = args["template"].as<std::string>();
  const std::string path = args["data"].as<std::string>();
  FERRY_CHECK(!ends_with(path, ".bin"), path, " is a token file already");
  const auto start = std::chrono::steady_clock::now();
  const auto dataset = data::open_dataset(path, 1, text_options);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const std::int64_t show = parse_integer(args["show"].as<std::string>(), "--show", 0, std::int64_t{1} << 40);
  for (std::int64_t i = 0; i < std::min(show, dataset->size()); ++i) {
    const data::Example example = dataset->get(i);
    std::vector<int> learned(example.tokens.size());
    for (std::size_t t = 0; t < learned.size(); ++t) {
      learned[t] = example.learned.empty() ? static_cast<std::int64_t>(t) >= example.prompt_tokens : example.learned[t];
    }
    std::cout << Json{{"tokens", example.tokens}, {"learned", learned}}.dump() << "\n";
  }
  const data::DatasetSummary summary = data::summarize(*dataset, 1);
  std::fprintf(stderr, "tokenized %s: %lld examples, %lld tokens (%lld learned answer-only) in %.2f s with %s\n",
               path.c_str(), static_cast<long long>(summary.examples), static_cast<long long>(summary.tokens),
               static_cast<long long>(summary.learned_tokens), seconds, tokenizer->kind().c_str());
  if (!args.count("out")) return 0;
  const std::string out = args["out"].as<std::string>();
  const std::int64_t tokens = write_token_file(*dataset, out, tokenizer->vocab_size());
  std::fprintf(stderr, "wrote %lld tokens to %s\n", static_cast<long long>(tokens), out.c_str());
  if (summary.learned_tokens < summary.tokens) {
    std::fprintf(stderr, "note: a token file holds tokens only: the prompts' answer-only masks and the examples' "
                         "boundaries are not in it (finetune on %s itself to keep them)\n", path.c_str());
  }
  return 0;
}

}  // namespace

FERRY_CLI_COMMAND("tokenize", "a model's tokenizer on a text, or a dataset into a token file", run_tokenize);

}  // namespace ferry::cli
