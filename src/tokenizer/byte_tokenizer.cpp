// ferry's built-in byte-level tokenizer behind the Tokenizer interface: the ids of
// data::ByteTokenizer, with its three special tokens written "<s>", "</s>" and "<pad>" so that a
// chat template's markup reaches them as a model tokenizer's special tokens do.

#include <array>

#include "ferry/check.h"
#include "ferry/tokenizer.h"

namespace ferry {
namespace {

constexpr std::int64_t kBos = 256, kEos = 257, kPad = 258, kVocabSize = 259;
const std::array<const char*, 3> kSpecialTexts = {"<s>", "</s>", "<pad>"};

class ByteTokenizer final : public Tokenizer {
 public:
  void encode(std::string_view text, std::vector<std::int32_t>& ids, std::vector<TokenSpan>* spans) const override {
    for (std::size_t at = 0; at < text.size();) {
      std::int64_t special = -1;
      std::size_t length = 1;
      if (text[at] == '<') {
        for (std::size_t i = 0; i < kSpecialTexts.size(); ++i) {
          const std::string_view candidate = kSpecialTexts[i];
          if (text.compare(at, candidate.size(), candidate) == 0) {
            special = kBos + static_cast<std::int64_t>(i);
            length = candidate.size();
          }
        }
      }
      ids.push_back(static_cast<std::int32_t>(special >= 0 ? special : static_cast<unsigned char>(text[at])));
      if (spans != nullptr) spans->push_back({static_cast<std::uint32_t>(at), static_cast<std::uint32_t>(at + length)});
      at += length;
    }
  }

  std::string decode(const std::vector<std::int64_t>& ids, bool skip_special_tokens) const override {
    std::string text;
    for (std::int64_t id : ids) {
      FERRY_CHECK(id >= 0 && id < kVocabSize, "byte tokenizer cannot decode token id ", id, ": valid ids are 0 to ",
                  kVocabSize - 1);
      if (id < 256) {
        text.push_back(static_cast<char>(static_cast<unsigned char>(id)));
      } else if (!skip_special_tokens) {
        text += kSpecialTexts[id - kBos];
      }
    }
    return text;
  }

  std::int64_t vocab_size() const override { return kVocabSize; }

  std::optional<std::int64_t> token_to_id(std::string_view token) const override {
    for (std::size_t i = 0; i < kSpecialTexts.size(); ++i) {
      if (token == kSpecialTexts[i]) return kBos + static_cast<std::int64_t>(i);
    }
    if (token.size() == 1) return static_cast<unsigned char>(token[0]);
    return std::nullopt;
  }

  std::string id_to_token(std::int64_t id) const override {
    FERRY_CHECK(id >= 0 && id < kVocabSize, "token id ", id, " is outside the byte tokenizer's vocabulary: valid are ",
                "0 to ", kVocabSize - 1);
    return id < 256 ? std::string(1, static_cast<char>(id)) : std::string(kSpecialTexts[id - kBos]);
  }

  std::string kind() const override { return "byte-level"; }
};

}  // namespace

std::shared_ptr<const Tokenizer> byte_tokenizer() {
  static const std::shared_ptr<const Tokenizer> instance = [] {
    auto tokenizer = std::make_shared<ByteTokenizer>();
    TokenizerInfo info;
    info.bos = SpecialToken{kSpecialTexts[0], kBos};
    info.eos = SpecialToken{kSpecialTexts[1], kEos};
    info.pad = SpecialToken{kSpecialTexts[2], kPad};
    info.adds_bos = true;
    info.stop_ids = {kEos};
    tokenizer->set_info(std::move(info));
    return tokenizer;
  }();
  return instance;
}

}  // namespace ferry
