#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>
#include <tbb/parallel_for.h>

#include "data/records.h"
#include "ferry/check.h"
#include "ferry/data.h"

namespace ferry::data {
namespace {

using Json = nlohmann::json;

class InMemoryDataset final : public Dataset {
 public:
  InMemoryDataset(std::string name, std::vector<Example> examples, std::optional<int64_t> vocab_size)
      : name_(std::move(name)), examples_(std::move(examples)) {
    for (int64_t i = 0; i < size(); ++i) check_example(examples_[i], i, name_, vocab_size);
  }

  int64_t size() const override { return static_cast<int64_t>(examples_.size()); }

  Example get(int64_t index) const override {
    FERRY_CHECK(index >= 0 && index < size(), "example index ", index, " of ", name_,
                " is out of range: valid are 0 to ", size() - 1);
    return examples_[index];
  }

  const std::string& name() const override { return name_; }

 private:
  std::string name_;
  std::vector<Example> examples_;
};

std::ifstream open_for_reading(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  FERRY_CHECK(file.is_open(), "cannot open ", path, ": ", std::strerror(errno));
  return file;
}

bool is_blank(const std::string& line) { return line.find_first_not_of(" \t\r\f\v") == std::string::npos; }

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

const Tokenizer& tokenizer_of(const TextOptions& options) {
  return options.tokenizer != nullptr ? *options.tokenizer : *byte_tokenizer();
}

void append_special(const std::optional<SpecialToken>& token, std::vector<int64_t>& tokens) {
  if (token) tokens.push_back(token->id);
}

std::string with_where(const std::string& where, const Error& error) { return where + ": " + error.what(); }

// Parsed records tokenized on every core; each record's example keeps its index, so the order is
// the file's whatever the threads do.
std::vector<Example> encode_records(const std::vector<Record>& records, const std::vector<std::string>& wheres,
                                    const TextOptions& options) {
  const Tokenizer& tokenizer = tokenizer_of(options);
  bool conversations = !options.chat_template.empty();
  for (const Record& record : records) conversations = conversations || record.kind == Record::Kind::kConversation;
  std::optional<ChatTemplate> chat;
  if (conversations) chat = ChatTemplate::for_tokenizer(tokenizer, options.chat_template);
  const bool template_for_prompts = !options.chat_template.empty();
  std::vector<Example> examples(records.size());
  std::vector<std::string> errors(records.size());
  tbb::parallel_for(tbb::blocked_range<std::size_t>(0, records.size(), 16), [&](const tbb::blocked_range<std::size_t>& range) {
    for (std::size_t i = range.begin(); i != range.end(); ++i) {
      const Record& record = records[i];
      try {
        switch (record.kind) {
          case Record::Kind::kText:
            examples[i] = encode_document(tokenizer, record.text);
            break;
          case Record::Kind::kPromptCompletion:
            examples[i] = template_for_prompts
                              ? encode_conversation(tokenizer, *chat, {{"user", record.prompt}, {"assistant", record.completion}})
                              : encode_prompt_completion(tokenizer, record.prompt, record.completion);
            break;
          case Record::Kind::kConversation:
            examples[i] = encode_conversation(tokenizer, *chat, record.messages);
            break;
        }
      } catch (const Error& error) {
        errors[i] = with_where(wheres[i], error);
      }
    }
  });
  for (const std::string& error : errors) FERRY_CHECK(error.empty(), error);
  return examples;
}

}  // namespace

const char* to_string(DataFormat format) {
  switch (format) {
    case DataFormat::kAuto: return "auto";
    case DataFormat::kText: return "text";
    case DataFormat::kPromptCompletion: return "prompt-completion";
    case DataFormat::kAlpaca: return "alpaca";
    case DataFormat::kMessages: return "messages";
    case DataFormat::kShareGpt: return "sharegpt";
  }
  FERRY_ASSERT(false, "unknown data format");
  return "";
}

DataFormat parse_data_format(const std::string& name) {
  for (DataFormat format : {DataFormat::kAuto, DataFormat::kText, DataFormat::kPromptCompletion, DataFormat::kAlpaca,
                            DataFormat::kMessages, DataFormat::kShareGpt}) {
    if (name == to_string(format)) return format;
  }
  FERRY_CHECK(false, "unknown data format '", name, "' (valid: auto, text, prompt-completion, alpaca, messages, sharegpt)");
  return DataFormat::kAuto;
}

Example encode_document(const Tokenizer& tokenizer, std::string_view text) {
  const TokenizerInfo& info = tokenizer.info();
  Example example;
  if (info.adds_bos) append_special(info.bos, example.tokens);
  for (int64_t id : tokenizer.encode(text)) example.tokens.push_back(id);
  append_special(info.eos, example.tokens);
  return example;
}

Example encode_prompt_completion(const Tokenizer& tokenizer, std::string_view prompt, std::string_view completion) {
  const TokenizerInfo& info = tokenizer.info();
  std::string text(prompt);
  text.append(completion);
  std::vector<std::int32_t> ids;
  std::vector<TokenSpan> spans;
  tokenizer.encode(text, ids, &spans);
  Example example;
  if (info.adds_bos) append_special(info.bos, example.tokens);
  example.prompt_tokens = static_cast<int64_t>(example.tokens.size());
  for (std::size_t i = 0; i < ids.size(); ++i) {
    example.tokens.push_back(ids[i]);
    if (spans[i].begin < prompt.size()) ++example.prompt_tokens;
  }
  append_special(info.eos, example.tokens);
  return example;
}

Example encode_conversation(const Tokenizer& tokenizer, const ChatTemplate& chat, const std::vector<ChatMessage>& messages) {
  const RenderedChat rendered = chat.render(messages, tokenizer.info(), /*add_generation_prompt=*/false);
  FERRY_CHECK(!rendered.learned.empty(), "the conversation has no assistant message to learn (", messages.size(),
              " messages, chat template ", chat.name(), ")");
  std::vector<std::int32_t> ids;
  std::vector<TokenSpan> spans;
  tokenizer.encode(rendered.text, ids, &spans);
  Example example;
  example.tokens.assign(ids.begin(), ids.end());
  example.learned.assign(ids.size(), 0);
  std::size_t range = 0;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    while (range < rendered.learned.size() && spans[i].begin >= rendered.learned[range].second) ++range;
    example.learned[i] = range < rendered.learned.size() && spans[i].begin >= rendered.learned[range].first;
  }
  while (example.prompt_tokens < static_cast<int64_t>(ids.size()) && !example.learned[example.prompt_tokens]) {
    ++example.prompt_tokens;
  }
  FERRY_CHECK(example.prompt_tokens < static_cast<int64_t>(ids.size()), "the conversation's assistant turns come out ",
              "as no tokens (chat template ", chat.name(), ")");
  return example;
}

std::shared_ptr<const Dataset> open_records(const std::string& path, const TextOptions& options) {
  std::ifstream file = open_for_reading(path);
  std::vector<Record> records;
  std::vector<std::string> wheres;
  if (ends_with(path, ".json")) {
    std::stringstream text;
    text << file.rdbuf();
    const Json document = Json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
    FERRY_CHECK(!document.is_discarded(), path, ": not valid JSON");
    FERRY_CHECK(document.is_array(), path, ": a .json dataset is a list of records, not a ", document.type_name(),
                " (one record per line is .jsonl)");
    for (std::size_t i = 0; i < document.size(); ++i) {
      wheres.push_back(path + ": record " + std::to_string(i));
      records.push_back(parse_record(document[i], options.format, wheres.back()));
    }
  } else {
    std::string line;
    for (int64_t line_number = 1; std::getline(file, line); ++line_number) {
      if (is_blank(line)) continue;
      wheres.push_back(path + ":" + std::to_string(line_number));
      const Json record = Json::parse(line, nullptr, /*allow_exceptions=*/false);
      FERRY_CHECK(!record.is_discarded(), wheres.back(), ": not valid JSON");
      records.push_back(parse_record(record, options.format, wheres.back()));
    }
    FERRY_CHECK(!file.bad(), "cannot read ", path, ": ", std::strerror(errno));
  }
  return make_dataset(path, encode_records(records, wheres, options));
}

std::shared_ptr<const Dataset> open_jsonl(const std::string& path) { return open_records(path); }

std::shared_ptr<const Dataset> open_text(const std::string& path, const TextOptions& options) {
  FERRY_CHECK(options.format == DataFormat::kAuto || options.format == DataFormat::kText, "data format ",
              to_string(options.format), " needs records (.jsonl or .json); ", path, " is plain text (valid: auto, text)");
  std::ifstream file = open_for_reading(path);
  std::vector<Record> records;
  std::vector<std::string> wheres;
  std::string document;
  std::string line;
  int64_t line_number = 0, first_line = 0;
  auto finish_document = [&] {
    if (document.empty()) return;
    Record record;
    record.text = std::move(document);
    records.push_back(std::move(record));
    wheres.push_back(path + ":" + std::to_string(first_line));
    document.clear();
  };
  while (std::getline(file, line)) {
    ++line_number;
    if (is_blank(line)) {
      finish_document();
    } else {
      if (document.empty()) first_line = line_number;
      document += document.empty() ? line : "\n" + line;
    }
  }
  FERRY_CHECK(!file.bad(), "cannot read ", path, ": ", std::strerror(errno));
  finish_document();
  return make_dataset(path, encode_records(records, wheres, options));
}

std::shared_ptr<const Dataset> open_dataset(const std::string& path, int64_t example_tokens, const TextOptions& options) {
  if (ends_with(path, ".bin")) return open_token_file(path, example_tokens);
  if (ends_with(path, ".jsonl") || ends_with(path, ".json")) return open_records(path, options);
  return open_text(path, options);
}

std::shared_ptr<const Dataset> make_dataset(std::string name, std::vector<Example> examples,
                                            std::optional<int64_t> vocab_size) {
  return std::make_shared<InMemoryDataset>(std::move(name), std::move(examples), vocab_size);
}

DatasetSummary summarize(const Dataset& dataset, int64_t sequence_length) {
  DatasetSummary summary;
  summary.examples = dataset.size();
  for (int64_t i = 0; i < dataset.size(); ++i) {
    const Example example = dataset.get(i);
    const auto tokens = static_cast<int64_t>(example.tokens.size());
    summary.tokens += tokens;
    summary.longest = std::max(summary.longest, tokens);
    summary.longer_than += tokens > sequence_length;
    if (example.learned.empty()) {
      summary.learned_tokens += tokens - example.prompt_tokens;
    } else {
      for (std::uint8_t learned : example.learned) summary.learned_tokens += learned;
    }
  }
  return summary;
}

}  // namespace ferry::data
