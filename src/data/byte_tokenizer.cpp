#include "ferry/check.h"
#include "ferry/data.h"

namespace ferry::data {

std::vector<int64_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<int64_t> ids;
  ids.reserve(text.size());
  for (char c : text) {
    ids.push_back(static_cast<unsigned char>(c));
  }
  return ids;
}

std::string ByteTokenizer::decode(const std::vector<int64_t>& ids) const {
  std::string text;
  text.reserve(ids.size());
  for (int64_t id : ids) {
    FERRY_CHECK(id >= 0 && id < kVocabSize, "byte tokenizer cannot decode token id ", id,
                ": valid ids are 0 to ", kVocabSize - 1);
    if (id < 256) {
      text.push_back(static_cast<char>(static_cast<unsigned char>(id)));
    }
  }
  return text;
}

Example ByteTokenizer::encode_document(std::string_view text) const {
  Example example;
  example.tokens.reserve(text.size() + 2);
  example.tokens.push_back(kBos);
  for (int64_t id : encode(text)) {
    example.tokens.push_back(id);
  }
  example.tokens.push_back(kEos);
  return example;
}

Example ByteTokenizer::encode_prompt_completion(std::string_view prompt,
                                                std::string_view completion) const {
  Example example;
  example.tokens.reserve(prompt.size() + completion.size() + 2);
  example.tokens.push_back(kBos);
  for (int64_t id : encode(prompt)) {
    example.tokens.push_back(id);
  }
  example.prompt_tokens = static_cast<int64_t>(example.tokens.size());
  for (int64_t id : encode(completion)) {
    example.tokens.push_back(id);
  }
  example.tokens.push_back(kEos);
  return example;
}

}  // namespace ferry::data
