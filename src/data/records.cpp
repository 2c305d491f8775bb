#include "data/records.h"

#include "ferry/check.h"

namespace ferry::data {
namespace {

using Json = nlohmann::json;

// Where a field is, for messages: "text", "messages"[1]["role"].
std::string path_of(const std::string& parent, const std::string& key) {
  return parent.empty() ? "\"" + key + "\"" : parent + "[\"" + key + "\"]";
}
std::string path_of(const std::string& parent, std::size_t index) { return parent + "[" + std::to_string(index) + "]"; }

const Json& field(const Json& object, const char* key, const std::string& path, const std::string& where) {
  FERRY_CHECK(object.contains(key), where, ": missing field ", path_of(path, key));
  return object.at(key);
}

std::string string_field(const Json& object, const char* key, const std::string& path, const std::string& where) {
  const Json& value = field(object, key, path, where);
  FERRY_CHECK(value.is_string(), where, ": field ", path_of(path, key), " is a ", value.type_name(),
              ", expected a string");
  return value.get<std::string>();
}

// An optional string field; absent and null are both empty.
std::string optional_string(const Json& object, const char* key, const std::string& path, const std::string& where) {
  if (!object.contains(key) || object.at(key).is_null()) return "";
  return string_field(object, key, path, where);
}

// OpenAI's content: a string, or a list of parts of which only {"type": "text", "text": ...} are
// text.
std::string message_content(const Json& message, const std::string& path, const std::string& where) {
  const Json& content = field(message, "content", path, where);
  const std::string content_path = path_of(path, "content");
  if (content.is_string()) return content.get<std::string>();
  FERRY_CHECK(content.is_array(), where, ": field ", content_path, " is a ", content.type_name(),
              ", expected a string or a list of {\"type\": \"text\", \"text\": ...} parts");
  std::string text;
  for (std::size_t i = 0; i < content.size(); ++i) {
    const std::string part_path = path_of(content_path, i);
    const Json& part = content[i];
    FERRY_CHECK(part.is_object(), where, ": field ", part_path, " is a ", part.type_name(), ", expected an object");
    const std::string type = optional_string(part, "type", part_path, where);
    FERRY_CHECK(type == "text", where, ": field ", path_of(part_path, "type"), " is \"", type,
                "\": only text parts can be trained on (valid: text)");
    text += string_field(part, "text", part_path, where);
  }
  return text;
}

std::vector<ChatMessage> openai_messages(const Json& record, const std::string& where) {
  const Json& messages = field(record, "messages", "", where);
  FERRY_CHECK(messages.is_array() && !messages.empty(), where, ": field \"messages\" must be a non-empty list of ",
              "{\"role\", \"content\"}, got ", messages.dump().substr(0, 80));
  std::vector<ChatMessage> out;
  for (std::size_t i = 0; i < messages.size(); ++i) {
    const std::string path = path_of("\"messages\"", i);
    const Json& message = messages[i];
    FERRY_CHECK(message.is_object(), where, ": field ", path, " is a ", message.type_name(), ", expected an object");
    const std::string role = string_field(message, "role", path, where);
    FERRY_CHECK(role == "system" || role == "user" || role == "assistant", where, ": field ", path_of(path, "role"),
                " is \"", role, "\" (valid: system, user, assistant)");
    out.push_back({role, message_content(message, path, where)});
  }
  return out;
}

std::vector<ChatMessage> sharegpt_messages(const Json& record, const std::string& where) {
  const Json& turns = field(record, "conversations", "", where);
  FERRY_CHECK(turns.is_array() && !turns.empty(), where, ": field \"conversations\" must be a non-empty list of ",
              "{\"from\", \"value\"}, got ", turns.dump().substr(0, 80));
  std::vector<ChatMessage> out;
  const std::string system = optional_string(record, "system", "", where);
  if (!system.empty()) out.push_back({"system", system});
  for (std::size_t i = 0; i < turns.size(); ++i) {
    const std::string path = path_of("\"conversations\"", i);
    const Json& turn = turns[i];
    FERRY_CHECK(turn.is_object(), where, ": field ", path, " is a ", turn.type_name(), ", expected an object");
    const std::string from = string_field(turn, "from", path, where);
    std::string role;
    if (from == "human" || from == "user") role = "user";
    if (from == "gpt" || from == "assistant") role = "assistant";
    if (from == "system") role = "system";
    FERRY_CHECK(!role.empty(), where, ": field ", path_of(path, "from"), " is \"", from,
                "\" (valid: human, gpt, system; user and assistant also)");
    out.push_back({role, string_field(turn, "value", path, where)});
  }
  return out;
}

// LLaMA-Factory's Alpaca: the instruction and the input (joined by a newline) are the user's
// turn, the output the assistant's; "system" and "history" ([[question, answer], ...]) optional.
std::vector<ChatMessage> alpaca_messages(const Json& record, const std::string& where) {
  std::vector<ChatMessage> out;
  const std::string system = optional_string(record, "system", "", where);
  if (!system.empty()) out.push_back({"system", system});
  if (record.contains("history") && !record.at("history").is_null()) {
    const Json& history = record.at("history");
    FERRY_CHECK(history.is_array(), where, ": field \"history\" is a ", history.type_name(),
                ", expected a list of [question, answer] pairs");
    for (std::size_t i = 0; i < history.size(); ++i) {
      const Json& pair = history[i];
      FERRY_CHECK(pair.is_array() && pair.size() == 2 && pair[0].is_string() && pair[1].is_string(), where,
                  ": field ", path_of("\"history\"", i), " is ", pair.dump().substr(0, 80),
                  ", expected a [question, answer] pair of strings");
      out.push_back({"user", pair[0].get<std::string>()});
      out.push_back({"assistant", pair[1].get<std::string>()});
    }
  }
  std::string instruction = string_field(record, "instruction", "", where);
  const std::string input = optional_string(record, "input", "", where);
  if (!input.empty()) instruction += "\n" + input;
  out.push_back({"user", instruction});
  out.push_back({"assistant", string_field(record, "output", "", where)});
  return out;
}

DataFormat detect(const Json& record, const std::string& where) {
  if (record.contains("messages")) return DataFormat::kMessages;
  if (record.contains("conversations")) return DataFormat::kShareGpt;
  if (record.contains("instruction")) return DataFormat::kAlpaca;
  const bool has_text = record.contains("text");
  const bool has_prompt = record.contains("prompt"), has_completion = record.contains("completion");
  FERRY_CHECK(!(has_text && (has_prompt || has_completion)), where,
              ": has both \"text\" and \"prompt\"/\"completion\"; a record is one or the other");
  if (has_text) return DataFormat::kText;
  FERRY_CHECK(has_prompt || has_completion, where, ": missing field \"text\" (or \"prompt\" and \"completion\", ",
              "\"instruction\" and \"output\", \"messages\", \"conversations\"); its fields are ",
              record.dump().substr(0, 120));
  FERRY_CHECK(has_prompt, where, ": missing field \"prompt\" (it has \"completion\")");
  FERRY_CHECK(has_completion, where, ": missing field \"completion\" (it has \"prompt\")");
  return DataFormat::kPromptCompletion;
}

}  // namespace

Record parse_record(const Json& record, DataFormat format, const std::string& where) {
  FERRY_CHECK(record.is_object(), where, ": a record must be a JSON object, not a ", record.type_name());
  if (format == DataFormat::kAuto) format = detect(record, where);
  Record parsed;
  switch (format) {
    case DataFormat::kText:
      parsed.kind = Record::Kind::kText;
      parsed.text = string_field(record, "text", "", where);
      break;
    case DataFormat::kPromptCompletion:
      parsed.kind = Record::Kind::kPromptCompletion;
      parsed.prompt = string_field(record, "prompt", "", where);
      parsed.completion = string_field(record, "completion", "", where);
      break;
    case DataFormat::kAlpaca:
      parsed.kind = Record::Kind::kConversation;
      parsed.messages = alpaca_messages(record, where);
      break;
    case DataFormat::kMessages:
      parsed.kind = Record::Kind::kConversation;
      parsed.messages = openai_messages(record, where);
      break;
    case DataFormat::kShareGpt:
      parsed.kind = Record::Kind::kConversation;
      parsed.messages = sharegpt_messages(record, where);
      break;
    case DataFormat::kAuto:
      FERRY_ASSERT(false, "detect returns a format");
  }
  return parsed;
}

}  // namespace ferry::data
