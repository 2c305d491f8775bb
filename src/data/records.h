#pragma once

// One record of a JSON Lines or JSON dataset, read into what it says: a document, a prompt with
// its completion, or a conversation. Formats and their fields: docs/data.md.

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ferry/data.h"
#include "ferry/tokenizer.h"

namespace ferry::data {

struct Record {
  enum class Kind { kText, kPromptCompletion, kConversation };
  Kind kind = Kind::kText;
  std::string text;                   // kText
  std::string prompt, completion;     // kPromptCompletion
  std::vector<ChatMessage> messages;  // kConversation
};

// `where` names the record in errors: "data.jsonl:3". Throws ferry::Error naming the field and
// what would be valid.
Record parse_record(const nlohmann::json& record, DataFormat format, const std::string& where);

}  // namespace ferry::data
