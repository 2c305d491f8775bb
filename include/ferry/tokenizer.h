#pragma once

// ferry's tokenizer layer: a model's own tokenizer, read from the files a Hugging Face model
// directory holds (tokenizer.json, else tokenizer.model through SentencePiece, with
// tokenizer_config.json, special_tokens_map.json, generation_config.json and config.json for the
// special tokens), the built-in byte-level tokenizer behind the same interface, and the chat
// templates of the known model families. Free of torch. docs/tokenizer.md describes it.
//
//   auto tokenizer = ferry::load_tokenizer("/models/Qwen2-0.5B-Instruct");
//   std::vector<std::int64_t> ids = tokenizer->encode("Hello world");
//   std::string text = tokenizer->decode(ids);

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ferry {

// Where a token came from: bytes [begin, end) of the text it was encoded from. Tokens that a
// normalizer changed together (an NFC composition, say) share the span of what they came from.
struct TokenSpan {
  std::uint32_t begin = 0;
  std::uint32_t end = 0;
};

struct SpecialToken {
  std::string text;
  std::int64_t id = -1;
};

// What the files beside the vocabulary say about using it.
struct TokenizerInfo {
  std::optional<SpecialToken> bos, eos, pad, unk;
  // Whether a document starts with BOS / ends with EOS when the tokenizer adds special tokens
  // (transformers' tokenizer(text)): tokenizer_config.json's add_bos_token / add_eos_token where
  // it says, else what tokenizer.json's post-processor inserts.
  bool adds_bos = false;
  bool adds_eos = false;
  // The ids generation stops at: generation_config.json's eos_token_id (one or a list), else the
  // EOS token. Chat templates add their end-of-turn token.
  std::vector<std::int64_t> stop_ids;
  // tokenizer_config.json's chat_template (or chat_template.jinja beside it), as written.
  std::optional<std::string> chat_template;
  std::optional<std::int64_t> model_max_length;
  // The files the tokenizer was read from, in the order they were read.
  std::vector<std::string> files;
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // What Hugging Face's encode(text, add_special_tokens=False) gives (SentencePiece's
  // encode(text) for a tokenizer.model): no BOS or EOS is added, and added and special tokens
  // that appear in the text are recognised. Appends to ids, and to spans when given. Throws
  // ferry::Error for text that is not valid UTF-8, naming the offset. Thread-safe.
  virtual void encode(std::string_view text, std::vector<std::int32_t>& ids,
                      std::vector<TokenSpan>* spans = nullptr) const = 0;
  std::vector<std::int64_t> encode(std::string_view text) const;

  // With the special tokens the tokenizer adds (transformers' tokenizer(text).input_ids).
  virtual std::vector<std::int64_t> encode_with_special_tokens(std::string_view text) const;

  // Hugging Face's decode(ids, skip_special_tokens): an id without a token is skipped, as the
  // reference skips it (SentencePiece and the byte tokenizer throw for one).
  virtual std::string decode(const std::vector<std::int64_t>& ids, bool skip_special_tokens = false) const = 0;

  // Ids are 0 to vocab_size() - 1, added tokens included.
  virtual std::int64_t vocab_size() const = 0;
  virtual std::optional<std::int64_t> token_to_id(std::string_view token) const = 0;
  // The token's text as the vocabulary holds it ("Ġworld", "▁the", "<|im_end|>").
  virtual std::string id_to_token(std::int64_t id) const = 0;

  // The kind, for messages: "tokenizer.json (BPE)", "tokenizer.model (SentencePiece)", "byte-level".
  virtual std::string kind() const = 0;

  const TokenizerInfo& info() const { return info_; }
  // Set once by whoever builds the tokenizer (load_tokenizer), before it is shared.
  void set_info(TokenizerInfo info) { info_ = std::move(info); }

 private:
  TokenizerInfo info_;
};

// Reads a tokenizer from a model directory, a directory holding only tokenizer files, or a
// tokenizer.json / *.model file: tokenizer.json is preferred, tokenizer.model (SentencePiece) is
// used when there is none. Throws ferry::Error naming the files looked for when none is there, and
// naming the file, the component and what is supported for anything it does not implement.
std::shared_ptr<const Tokenizer> load_tokenizer(const std::string& path);

// Whether path (a directory) holds a tokenizer load_tokenizer would read.
bool has_tokenizer(const std::string& directory);

// The files load_tokenizer reads from a directory (and an export copies), in the order it
// looks for them.
const std::vector<std::string>& tokenizer_file_names();

// ferry's built-in tokenizer: ids 0-255 are the bytes of the UTF-8 text, 256 BOS, 257 EOS,
// 258 PAD (data::ByteTokenizer's ids), 259 in all.
std::shared_ptr<const Tokenizer> byte_tokenizer();

// Encodes every text on all cores (oneTBB); result[i] is tokenizer.encode(texts[i]).
std::vector<std::vector<std::int32_t>> encode_batch(const Tokenizer& tokenizer,
                                                    const std::vector<std::string_view>& texts);

// --- chat templates ----------------------------------------------------------------------------

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

// A conversation rendered as text, with the byte ranges the model learns: each assistant turn
// and the token that ends it.
struct RenderedChat {
  std::string text;
  std::vector<std::pair<std::size_t, std::size_t>> learned;
};

// The chat formats of the families ferry knows, rendered as their Jinja templates render them
// (transformers' apply_chat_template): qwen2 (ChatML with Qwen2's default system message), chatml,
// llama3, llama2 and mistral / mistral-v0.1 ([INST]), and plain (no markup: system, user and
// assistant contents one after another, each assistant turn ended by EOS).
class ChatTemplate {
 public:
  // Throws ferry::Error listing the names for an unknown one.
  static ChatTemplate named(const std::string& name);
  // The known template whose Jinja source this is, if any.
  static std::optional<ChatTemplate> recognize(const std::string& jinja_source);
  static std::vector<std::string> names();

  // --template NAME if given, else the tokenizer's own chat template when it is a known one
  // (an unknown one is refused with the supported names), else plain.
  static ChatTemplate for_tokenizer(const Tokenizer& tokenizer, const std::string& requested_name = "");

  const std::string& name() const { return name_; }

  // Throws ferry::Error, naming the message, where the template's own Jinja would raise (roles
  // that do not alternate, a system message where the template has none) or for an unknown role.
  RenderedChat render(const std::vector<ChatMessage>& messages, const TokenizerInfo& tokens,
                      bool add_generation_prompt) const;

  // The text of the token that ends an assistant turn ("<|im_end|>", "<|eot_id|>"); empty when
  // it is the tokenizer's EOS.
  std::string end_of_turn() const;

 private:
  explicit ChatTemplate(std::string name) : name_(std::move(name)) {}
  std::string name_;
};

}  // namespace ferry
