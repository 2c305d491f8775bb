// Text datasets tokenized with a model's tokenizer: every record format, what answer-only training
// learns of each, and errors that name the file, the line and the field.

#include "support/catch.h"

#include <fstream>
#include <string>
#include <vector>

#include "ferry/check.h"
#include "ferry/data.h"
#include "ferry/tokenizer.h"
#include "support/temp_dir.h"
#include "tokenizer/fixture_path.h"

namespace {

using Catch::Matchers::Contains;
using ferry::data::Example;

void write_file(const std::string& path, const std::string& text) {
  std::ofstream file(path, std::ios::binary);
  file << text;
}

std::shared_ptr<const ferry::Tokenizer> fixture(const std::string& name) {
  return ferry::load_tokenizer(ferry::testing::tokenizer_fixtures() + "/hf/" + name);
}

// The text of the learned tokens and of the others, decoded separately.
std::pair<std::string, std::string> learned_and_not(const ferry::Tokenizer& tokenizer, const Example& example) {
  std::vector<std::int64_t> learned, other;
  for (std::size_t i = 0; i < example.tokens.size(); ++i) {
    const bool is_learned =
        example.learned.empty() ? static_cast<std::int64_t>(i) >= example.prompt_tokens : example.learned[i] != 0;
    (is_learned ? learned : other).push_back(example.tokens[i]);
  }
  return {tokenizer.decode(learned), tokenizer.decode(other)};
}

}  // namespace

TEST_CASE("every record format becomes the example the model's template makes of it") {
  ferry::testing::TempDir dir;
  const auto qwen2 = fixture("qwen2");  // its chat template is Qwen2's ChatML
  write_file(dir.file("data.jsonl"),
             R"({"text": "A plain document."})" "\n"
             R"({"prompt": "2+2=", "completion": "4"})" "\n"
             R"({"instruction": "Add", "input": "2 and 2", "output": "4", "system": "Be exact."})" "\n"
             R"({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},)"
             R"( {"role": "user", "content": "Bye"}, {"role": "assistant", "content": [{"type": "text", "text": "Bye."}]}]})" "\n"
             R"({"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}], "system": "S."})" "\n");
  ferry::data::TextOptions options;
  options.tokenizer = qwen2;
  const auto dataset = ferry::data::open_records(dir.file("data.jsonl"), options);
  REQUIRE(dataset->size() == 5);
  const std::int64_t eos = qwen2->info().eos->id;

  const Example text = dataset->get(0);
  CHECK(text.tokens.back() == eos);
  CHECK(text.prompt_tokens == 0);
  CHECK(learned_and_not(*qwen2, text).first == "A plain document.<|im_end|>");

  const Example prompt = dataset->get(1);
  CHECK(learned_and_not(*qwen2, prompt) == std::pair<std::string, std::string>{"4<|im_end|>", "2+2="});

  const Example alpaca = dataset->get(2);
  CHECK(learned_and_not(*qwen2, alpaca).first == "4<|im_end|>");
  CHECK(learned_and_not(*qwen2, alpaca).second ==
        "<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\nAdd\n2 and 2<|im_end|>\n<|im_start|>assistant\n\n");

  const Example chat = dataset->get(3);  // both assistant turns learned, nothing else
  CHECK(learned_and_not(*qwen2, chat).first == "Hello!<|im_end|>Bye.<|im_end|>");
  CHECK(learned_and_not(*qwen2, chat).second ==
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n\n");

  const Example sharegpt = dataset->get(4);
  CHECK(learned_and_not(*qwen2, sharegpt).first == "A.<|im_end|>");
  // The whole conversation tokenizes as the rendered text does: what transformers gives for
  // apply_chat_template(tokenize=True).
  CHECK(sharegpt.tokens == qwen2->encode("<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
                                         "<|im_start|>assistant\nA.<|im_end|>\n"));
}

TEST_CASE("a chosen template renders prompt/completion records too, and BOS comes from the template") {
  ferry::testing::TempDir dir;
  const auto llama2 = fixture("llama2-legacy");
  write_file(dir.file("data.json"), R"([{"prompt": "Hi there", "completion": " Hello friend"}])");
  ferry::data::TextOptions options;
  options.tokenizer = llama2;
  options.chat_template = "llama2";
  const Example example = ferry::data::open_records(dir.file("data.json"), options)->get(0);
  CHECK(example.tokens.front() == llama2->info().bos->id);
  CHECK(learned_and_not(*llama2, example).first == "Hello friend </s>");
  // Without the template: the prompt's text, then the completion's, as one text.
  options.chat_template.clear();
  const Example plain = ferry::data::open_records(dir.file("data.json"), options)->get(0);
  CHECK(plain.tokens.front() == llama2->info().bos->id);  // Llama adds BOS
  CHECK(plain.tokens.back() == llama2->info().eos->id);
  CHECK(learned_and_not(*llama2, plain).first == "Hello friend</s>");
  CHECK(learned_and_not(*llama2, plain).second == "<s> Hi there");
}

TEST_CASE("the loader's labels learn exactly what the example marks, turn by turn") {
  Example example;
  example.tokens = {1, 2, 3, 4, 5, 6};
  example.learned = {0, 1, 1, 0, 0, 1};
  ferry::data::LoaderOptions options;
  options.batch_size = 1;
  options.sequence_length = 8;
  options.pack = false;
  options.answer_only = true;
  options.shuffle = false;
  options.pad_token = 0;
  ferry::data::DataLoader loader(ferry::data::make_dataset("chat", {example}), options);
  const ferry::data::Batch batch = loader.next();
  const std::vector<std::int64_t> labels(batch.labels.data_ptr<std::int64_t>(), batch.labels.data_ptr<std::int64_t>() + 8);
  const std::int64_t ignore = ferry::data::kIgnoreIndex;
  CHECK(labels == std::vector<std::int64_t>{ignore, 2, 3, ignore, ignore, 6, ignore, ignore});
}

TEST_CASE("a single-pass loader gives every example once and pads the last batch") {
  std::vector<Example> examples;
  for (std::int64_t i = 0; i < 5; ++i) examples.push_back({{10 + i, 20 + i, 30 + i}, 0, {}});
  ferry::data::LoaderOptions options;
  options.batch_size = 2;
  options.sequence_length = 4;
  options.pack = false;
  options.shuffle = false;
  options.single_pass = true;
  options.pad_token = 0;
  ferry::data::DataLoader loader(ferry::data::make_dataset("five", examples), options);
  std::vector<std::int64_t> firsts;
  int batches = 0;
  while (!loader.finished()) {
    const ferry::data::Batch batch = loader.next();
    ++batches;
    for (std::int64_t row = 0; row < 2; ++row) firsts.push_back(batch.input_ids[row][0].item<std::int64_t>());
    if (batches == 3) {
      CHECK(batch.attention_mask[1].sum().item<std::int64_t>() == 0);
      CHECK(batch.labels[1].eq(ferry::data::kIgnoreIndex).all().item<bool>());
    }
  }
  CHECK(batches == 3);
  CHECK(firsts == std::vector<std::int64_t>{10, 11, 12, 13, 14, 0});
  CHECK_THROWS_WITH(loader.next(), Contains("single pass") && Contains("over"));
}

TEST_CASE("bad records name the file, the line and the field") {
  ferry::testing::TempDir dir;
  const auto open = [&](const std::string& lines, ferry::data::DataFormat format = ferry::data::DataFormat::kAuto) {
    write_file(dir.file("bad.jsonl"), lines);
    ferry::data::TextOptions options;
    options.tokenizer = fixture("qwen2");
    options.format = format;
    return ferry::data::open_records(dir.file("bad.jsonl"), options);
  };
  CHECK_THROWS_WITH(open("{\"text\": \"ok\"}\n{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}]}\n"),
                    Contains("bad.jsonl:2") && Contains("\"messages\"[0][\"role\"] is \"tool\"") &&
                        Contains("system, user, assistant"));
  CHECK_THROWS_WITH(open("{\"messages\": [{\"role\": \"user\"}]}\n"),
                    Contains("bad.jsonl:1") && Contains("missing field \"messages\"[0][\"content\"]"));
  CHECK_THROWS_WITH(open("{\"conversations\": [{\"from\": \"robot\", \"value\": \"x\"}]}\n"),
                    Contains("bad.jsonl:1") && Contains("\"conversations\"[0][\"from\"] is \"robot\"") &&
                        Contains("human, gpt"));
  CHECK_THROWS_WITH(open("{\"instruction\": \"do\"}\n"), Contains("bad.jsonl:1") && Contains("missing field \"output\""));
  CHECK_THROWS_WITH(open("{\"instruction\": \"do\", \"output\": 3}\n"),
                    Contains("bad.jsonl:1") && Contains("\"output\" is a number"));
  CHECK_THROWS_WITH(open("{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\"}]}]}\n"),
                    Contains("\"messages\"[0][\"content\"][0][\"type\"] is \"image\"") && Contains("valid: text"));
  CHECK_THROWS_WITH(open("{\"messages\": [{\"role\": \"user\", \"content\": \"only a question\"}]}\n"),
                    Contains("bad.jsonl:1") && Contains("no assistant message"));
  CHECK_THROWS_WITH(open("{\"text\": \"a\"}\n", ferry::data::DataFormat::kAlpaca),
                    Contains("bad.jsonl:1") && Contains("missing field \"instruction\""));
  CHECK_THROWS_WITH(ferry::data::parse_data_format("csv"), Contains("'csv'") && Contains("sharegpt"));

  // A model whose chat template ferry does not know refuses conversations, and says what to do.
  const std::string model = dir.subdir("model");
  const std::string source = ferry::testing::tokenizer_fixtures() + "/hf/gpt2/tokenizer.json";
  std::ifstream in(source, std::ios::binary);
  std::ofstream(model + "/tokenizer.json", std::ios::binary) << in.rdbuf();
  write_file(model + "/tokenizer_config.json", R"({"eos_token": "<|endoftext|>", "chat_template": "{{ messages }}"})");
  write_file(dir.file("chat.jsonl"), "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, "
                                     "{\"role\": \"assistant\", \"content\": \"a\"}]}\n");
  ferry::data::TextOptions options;
  options.tokenizer = ferry::load_tokenizer(model);
  CHECK_THROWS_WITH(ferry::data::open_records(dir.file("chat.jsonl"), options),
                    Contains("is not one ferry renders") && Contains("--template") && Contains("chatml"));
  options.chat_template = "chatml";
  CHECK(ferry::data::open_records(dir.file("chat.jsonl"), options)->size() == 1);
  // Text needs no template, known or not.
  write_file(dir.file("text.jsonl"), "{\"text\": \"fine\"}\n");
  options.chat_template.clear();
  CHECK(ferry::data::open_records(dir.file("text.jsonl"), options)->size() == 1);
}

TEST_CASE("summarize counts what a job warns about") {
  std::vector<Example> examples = {{{1, 2, 3}, 1, {}}, {{1, 2, 3, 4, 5}, 0, {}}, {{1, 2}, 0, {0, 1}}};
  const auto summary = ferry::data::summarize(*ferry::data::make_dataset("three", examples), 4);
  CHECK(summary.examples == 3);
  CHECK(summary.tokens == 10);
  CHECK(summary.longest == 5);
  CHECK(summary.longer_than == 1);
  CHECK(summary.learned_tokens == 2 + 5 + 1);
}
