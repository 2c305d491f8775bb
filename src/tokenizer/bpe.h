#pragma once

// Hugging Face's BPE model: each pre-tokenized word starts as its characters' ids (or bytes',
// for a byte-level vocabulary) and pairs are merged lowest rank first, leftmost among equals,
// until no pair of the merge list remains. Recent words are cached per thread.

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tokenizer/tables.h"

namespace ferry::tokenizer {

struct BpeOptions {
  std::optional<std::string> unk_token;
  std::string continuing_subword_prefix;
  std::string end_of_word_suffix;
  bool fuse_unk = false;
  bool byte_fallback = false;
  bool ignore_merges = false;
  // The words are bytes that a ByteLevel pre-tokenizer maps to characters one to one (GPT-2's
  // table); the vocabulary is written in those characters.
  bool byte_level = false;
};

class Bpe {
 public:
  // tokens[id] is the vocabulary's string for id (empty where no token has that id); merges are
  // pairs of vocabulary strings in rank order. `where` names the file in errors.
  Bpe(std::vector<std::string> tokens, const std::vector<std::pair<std::string, std::string>>& merges,
      BpeOptions options, const std::string& where);

  struct Symbol {
    std::int32_t id;
    std::uint32_t length;
    std::int32_t previous;
    std::int32_t next;
  };
  struct Candidate {
    std::uint32_t rank;
    std::uint32_t position;
    std::int32_t merged;
  };
  // One thread's buffers and word cache for one model.
  struct Scratch {
    WordCache cache;
    std::vector<Symbol> symbols;
    std::vector<Candidate> heap;
    std::vector<std::int32_t> ids;
    std::vector<std::uint32_t> lengths;
    std::string key;
  };
  // This thread's scratch for this model; fetch it once per text, not per word.
  Scratch& thread_scratch() const;

  // Appends the tokens of one word, and the bytes of the word each covers.
  void tokenize(std::string_view word, std::vector<std::int32_t>& ids, std::vector<std::uint32_t>* lengths,
                Scratch& scratch) const;

  // -1 when absent; token is the vocabulary's string.
  std::int32_t token_to_id(std::string_view token) const { return vocabulary_.find(token); }
  // Null when no token has the id.
  const std::string* id_to_token(std::int32_t id) const;
  std::int32_t size() const { return static_cast<std::int32_t>(tokens_.size()); }

 private:
  void initial_symbols(std::string_view word, Scratch& scratch) const;
  void merge(Scratch& scratch) const;

  std::vector<std::string> tokens_;
  StringTable vocabulary_;   // the vocabulary's strings
  StringTable word_tokens_;  // what a word is matched against: raw bytes for a byte-level vocabulary
  MergeTable merges_;
  BpeOptions options_;
  std::string where_;
  std::int32_t unk_id_ = -1;
  std::array<std::int32_t, 256> byte_ids_{};      // byte-level: each byte's token; -1 when missing
  std::array<std::int32_t, 256> fallback_ids_{};  // "<0xAB>" tokens; -1 when missing
  std::array<std::int32_t, 128> ascii_ids_{};     // the ASCII characters' tokens, -1 when missing
  std::array<std::string, 256> byte_chars_;       // byte-level: the character each byte stands as
  std::uint64_t scratch_owner_;                   // identifies this model's per-thread scratch
};

// GPT-2's table: byte b stands as this code point in a byte-level vocabulary.
char32_t byte_level_char(unsigned char byte);
// The inverse; -1 for a code point that stands for no byte.
int byte_level_byte(char32_t code_point);

}  // namespace ferry::tokenizer
