// The chat templates of the families ferry knows, rendered in C++ exactly as their Jinja sources
// render under transformers' apply_chat_template (tests compare both on every template), and
// recognised by their source text.

#include <algorithm>
#include <map>

#include "ferry/check.h"
#include "ferry/tokenizer.h"
#include "tokenizer/unicode.h"

namespace ferry {
namespace {

// The sources as the models ship them (tokenizer_config.json's chat_template, JSON-decoded);
// tools/tokenizer_fixtures.py holds the same strings.
const std::map<std::string, std::vector<std::string>>& known_sources() {
  static const std::map<std::string, std::vector<std::string>> sources = {
      {"qwen2",  // Qwen/Qwen2-0.5B-Instruct and the other Qwen2 instruct models
       {"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"}},
      {"chatml",  // ChatML without a default system message (teknium/OpenHermes-2.5-Mistral-7B, ...)
       {"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"}},
      {"llama3",  // meta-llama/Meta-Llama-3-8B-Instruct
       {"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
        "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"}},
      {"llama2",  // meta-llama/Llama-2-7b-chat-hf
       {"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"}},
      {"mistral-v0.1",  // mistralai/Mistral-7B-Instruct-v0.1
       {"{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"}},
      {"mistral",  // mistralai/Mixtral-8x7B-Instruct-v0.1
       {"{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"}},
  };
  return sources;
}

// Note: templates are compared after trimming and writing each newline character as the escape
// \n: inside a Jinja string literal the two are the same, and tokenizer_config.json files carry
// either, depending on who wrote them.
std::string canonical(const std::string& source) {
  const std::size_t begin = source.find_first_not_of(" \t\r\n");
  if (begin == std::string::npos) return "";
  const std::size_t end = source.find_last_not_of(" \t\r\n");
  std::string out;
  for (std::size_t i = begin; i <= end; ++i) {
    if (source[i] == '\n') {
      out += "\\n";
    } else {
      out += source[i];
    }
  }
  return out;
}

// Python's str.isspace, which Jinja's trim filter and str.strip() use.
bool is_python_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

std::string python_strip(const std::string& text) {
  std::size_t begin = 0, end = text.size();
  while (begin < end) {
    const tokenizer::DecodedChar decoded = tokenizer::decode_utf8(text, begin);
    if (!is_python_space(decoded.code_point)) break;
    begin += decoded.bytes;
  }
  while (end > begin) {
    std::size_t start = end - 1;
    while (start > begin && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) --start;
    if (!is_python_space(tokenizer::decode_utf8(text, start).code_point)) break;
    end = start;
  }
  return text.substr(begin, end - begin);
}

// Builds the text and its learned ranges.
class Writer {
 public:
  void text(const std::string& part) { rendered_.text += part; }
  void learned(const std::string& part) {
    const std::size_t begin = rendered_.text.size();
    rendered_.text += part;
    if (!part.empty()) rendered_.learned.emplace_back(begin, rendered_.text.size());
  }
  RenderedChat finish() { return std::move(rendered_); }

 private:
  RenderedChat rendered_;
};

std::string special_text(const std::optional<SpecialToken>& token) { return token ? token->text : std::string(); }

[[noreturn]] void raise(const std::string& name, const std::string& message, std::size_t index,
                        const ChatMessage& offending) {
  throw Error(detail::concat("chat template ", name, ": ", message, " (message ", index, " has role '",
                             offending.role, "')"));
}

void check_alternation(const std::string& name, const std::vector<ChatMessage>& messages, std::size_t offset) {
  for (std::size_t i = offset; i < messages.size(); ++i) {
    if ((messages[i].role == "user") != ((i - offset) % 2 == 0)) {
      raise(name, "Conversation roles must alternate user/assistant/user/assistant/...", i, messages[i]);
    }
  }
}

RenderedChat render_chatml(const std::vector<ChatMessage>& messages, bool default_system, bool add_generation_prompt) {
  Writer out;
  for (std::size_t i = 0; i < messages.size(); ++i) {
    if (i == 0 && default_system && messages[0].role != "system") {
      out.text("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n");
    }
    out.text("<|im_start|>" + messages[i].role + "\n");
    if (messages[i].role == "assistant") {
      out.learned(messages[i].content + "<|im_end|>");
    } else {
      out.text(messages[i].content + "<|im_end|>");
    }
    out.text("\n");
  }
  if (add_generation_prompt) out.text("<|im_start|>assistant\n");
  return out.finish();
}

RenderedChat render_llama3(const std::vector<ChatMessage>& messages, const TokenizerInfo& tokens,
                           bool add_generation_prompt) {
  Writer out;
  for (std::size_t i = 0; i < messages.size(); ++i) {
    if (i == 0) out.text(special_text(tokens.bos));
    out.text("<|start_header_id|>" + messages[i].role + "<|end_header_id|>\n\n");
    const std::string content = python_strip(messages[i].content) + "<|eot_id|>";
    if (messages[i].role == "assistant") {
      out.learned(content);
    } else {
      out.text(content);
    }
  }
  if (add_generation_prompt) out.text("<|start_header_id|>assistant<|end_header_id|>\n\n");
  return out.finish();
}

RenderedChat render_llama2(const std::vector<ChatMessage>& messages, const TokenizerInfo& tokens) {
  const bool has_system = !messages.empty() && messages[0].role == "system";
  const std::size_t first = has_system ? 1 : 0;
  check_alternation("llama2", messages, first);
  Writer out;
  for (std::size_t i = first; i < messages.size(); ++i) {
    std::string content = messages[i].content;
    if (i == first && has_system) content = "<<SYS>>\n" + messages[0].content + "\n<</SYS>>\n\n" + content;
    // As the template: a system message later in the conversation renders nothing.
    if (messages[i].role == "user") {
      out.text(special_text(tokens.bos) + "[INST] " + python_strip(content) + " [/INST]");
    } else if (messages[i].role == "assistant") {
      out.learned(" " + python_strip(content) + " " + special_text(tokens.eos));
    }
  }
  return out.finish();
}

RenderedChat render_mistral(const std::string& name, const std::vector<ChatMessage>& messages,
                            const TokenizerInfo& tokens, bool space_after_eos) {
  Writer out;
  out.text(special_text(tokens.bos));
  for (std::size_t i = 0; i < messages.size(); ++i) {
    if ((messages[i].role == "user") != (i % 2 == 0)) {
      raise(name, "Conversation roles must alternate user/assistant/user/assistant/...", i, messages[i]);
    }
    if (messages[i].role == "user") {
      out.text("[INST] " + messages[i].content + " [/INST]");
    } else if (messages[i].role == "assistant") {
      out.learned(messages[i].content + special_text(tokens.eos));
      if (space_after_eos) out.text(" ");
    } else {
      raise(name, "Only user and assistant roles are supported!", i, messages[i]);
    }
  }
  return out.finish();
}

RenderedChat render_plain(const std::vector<ChatMessage>& messages, const TokenizerInfo& tokens) {
  Writer out;
  if (tokens.adds_bos) out.text(special_text(tokens.bos));
  for (std::size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& message = messages[i];
    if (message.role == "system") {
      out.text(message.content + "\n\n");
    } else if (message.role == "user") {
      out.text(message.content + "\n");
    } else {
      out.learned(message.content + special_text(tokens.eos));
      if (i + 1 < messages.size()) out.text("\n");
    }
  }
  return out.finish();
}

std::string names_text() {
  std::string text;
  for (const std::string& name : ChatTemplate::names()) text += (text.empty() ? "" : ", ") + name;
  return text;
}

}  // namespace

std::vector<std::string> ChatTemplate::names() {
  std::vector<std::string> names;
  for (const auto& entry : known_sources()) names.push_back(entry.first);
  names.push_back("plain");
  std::sort(names.begin(), names.end());
  return names;
}

ChatTemplate ChatTemplate::named(const std::string& name) {
  const std::vector<std::string> valid = names();
  FERRY_CHECK(std::find(valid.begin(), valid.end(), name) != valid.end(), "unknown chat template '", name,
              "' (valid: ", names_text(), ")");
  return ChatTemplate(name);
}

std::optional<ChatTemplate> ChatTemplate::recognize(const std::string& jinja_source) {
  const std::string wanted = canonical(jinja_source);
  for (const auto& [name, sources] : known_sources()) {
    for (const std::string& source : sources) {
      if (canonical(source) == wanted) return ChatTemplate(name);
    }
  }
  return std::nullopt;
}

ChatTemplate ChatTemplate::for_tokenizer(const Tokenizer& tokenizer, const std::string& requested_name) {
  if (!requested_name.empty()) return named(requested_name);
  const std::optional<std::string>& source = tokenizer.info().chat_template;
  if (!source) return ChatTemplate("plain");
  std::optional<ChatTemplate> known = recognize(*source);
  std::string where = tokenizer.info().files.empty() ? tokenizer.kind() : tokenizer.info().files.front();
  FERRY_CHECK(known.has_value(), "the model's chat template (beside ", where, ", ", source->size(),
              " characters, starting '", source->substr(0, 60), "') is not one ferry renders: choose one with ",
              "--template (valid: ", names_text(), ")");
  return *known;
}

RenderedChat ChatTemplate::render(const std::vector<ChatMessage>& messages, const TokenizerInfo& tokens,
                                  bool add_generation_prompt) const {
  for (std::size_t i = 0; i < messages.size(); ++i) {
    const std::string& role = messages[i].role;
    FERRY_CHECK(role == "system" || role == "user" || role == "assistant", "chat template ", name_, ": message ", i,
                " has role '", role, "' (valid: system, user, assistant)");
  }
  if (name_ == "qwen2" || name_ == "chatml") return render_chatml(messages, name_ == "qwen2", add_generation_prompt);
  if (name_ == "llama3") return render_llama3(messages, tokens, add_generation_prompt);
  if (name_ == "llama2") return render_llama2(messages, tokens);
  if (name_ == "mistral" || name_ == "mistral-v0.1") {
    return render_mistral(name_, messages, tokens, name_ == "mistral-v0.1");
  }
  FERRY_ASSERT(name_ == "plain", "unknown chat template ", name_);
  return render_plain(messages, tokens);
}

std::string ChatTemplate::end_of_turn() const {
  if (name_ == "qwen2" || name_ == "chatml") return "<|im_end|>";
  if (name_ == "llama3") return "<|eot_id|>";
  return "";
}

}  // namespace ferry
