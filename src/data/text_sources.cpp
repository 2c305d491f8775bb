#include <cerrno>
#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>

#include "ferry/check.h"
#include "ferry/data.h"

namespace ferry::data {
namespace {

class InMemoryDataset final : public Dataset {
 public:
  InMemoryDataset(std::string name, std::vector<Example> examples)
      : name_(std::move(name)), examples_(std::move(examples)) {
    for (size_t i = 0; i < examples_.size(); ++i) {
      const Example& example = examples_[i];
      FERRY_CHECK(!example.tokens.empty(), "example ", i, " of ", name_,
                  " has no tokens: every example needs at least one");
      FERRY_CHECK(example.prompt_tokens >= 0 &&
                      example.prompt_tokens <= static_cast<int64_t>(example.tokens.size()),
                  "example ", i, " of ", name_, " has prompt_tokens ", example.prompt_tokens,
                  ": valid are 0 to its ", example.tokens.size(), " tokens");
    }
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

std::string string_field(const nlohmann::json& line, const char* field,
                         const std::string& where) {
  const nlohmann::json& value = line.at(field);
  FERRY_CHECK(value.is_string(), where, ": field \"", field, "\" is a ", value.type_name(),
              ", expected a string");
  return value.get<std::string>();
}

Example parse_jsonl_line(const std::string& text, const std::string& where) {
  nlohmann::json line = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  FERRY_CHECK(!line.is_discarded(), where, ": not valid JSON");
  FERRY_CHECK(line.is_object(), where, ": a line must be a JSON object, not a ",
              line.type_name());
  bool has_text = line.contains("text");
  bool has_prompt = line.contains("prompt");
  bool has_completion = line.contains("completion");
  FERRY_CHECK(!(has_text && (has_prompt || has_completion)), where,
              ": has both \"text\" and \"prompt\"/\"completion\"; a line is one or the other");
  ByteTokenizer tokenizer;
  if (has_text) {
    return tokenizer.encode_document(string_field(line, "text", where));
  }
  FERRY_CHECK(has_prompt || has_completion, where,
              ": missing field \"text\" (or \"prompt\" and \"completion\")");
  FERRY_CHECK(has_prompt, where, ": missing field \"prompt\" (it has \"completion\")");
  FERRY_CHECK(has_completion, where, ": missing field \"completion\" (it has \"prompt\")");
  return tokenizer.encode_prompt_completion(string_field(line, "prompt", where),
                                            string_field(line, "completion", where));
}

bool is_blank(const std::string& line) {
  return line.find_first_not_of(" \t\r\f\v") == std::string::npos;
}

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

std::shared_ptr<const Dataset> open_jsonl(const std::string& path) {
  std::ifstream file = open_for_reading(path);
  std::vector<Example> examples;
  std::string line;
  for (int64_t line_number = 1; std::getline(file, line); ++line_number) {
    if (!is_blank(line)) {
      examples.push_back(parse_jsonl_line(line, path + ":" + std::to_string(line_number)));
    }
  }
  FERRY_CHECK(!file.bad(), "cannot read ", path, ": ", std::strerror(errno));
  return make_dataset(path, std::move(examples));
}

std::shared_ptr<const Dataset> open_text(const std::string& path) {
  std::ifstream file = open_for_reading(path);
  ByteTokenizer tokenizer;
  std::vector<Example> examples;
  std::string document;
  std::string line;
  auto finish_document = [&] {
    if (!document.empty()) {
      examples.push_back(tokenizer.encode_document(document));
      document.clear();
    }
  };
  while (std::getline(file, line)) {
    if (is_blank(line)) {
      finish_document();
    } else {
      document += document.empty() ? line : "\n" + line;
    }
  }
  FERRY_CHECK(!file.bad(), "cannot read ", path, ": ", std::strerror(errno));
  finish_document();
  return make_dataset(path, std::move(examples));
}

std::shared_ptr<const Dataset> open_dataset(const std::string& path, int64_t example_tokens) {
  if (ends_with(path, ".bin")) {
    return open_token_file(path, example_tokens);
  }
  if (ends_with(path, ".jsonl")) {
    return open_jsonl(path);
  }
  return open_text(path);
}

std::shared_ptr<const Dataset> make_dataset(std::string name, std::vector<Example> examples) {
  return std::make_shared<InMemoryDataset>(std::move(name), std::move(examples));
}

}  // namespace ferry::data
