#include "tokenizer/hf_tokenizer.h"

#include <algorithm>
#include <array>
#include <deque>
#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "ferry/check.h"
#include "tokenizer/bpe.h"
#include "tokenizer/pattern.h"
#include "tokenizer/unicode.h"

namespace ferry::tokenizer {
namespace {

using Json = nlohmann::json;

constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// --- reading tokenizer.json ---------------------------------------------------------------------

// One object of tokenizer.json and where it is, for messages: "tokenizer.json: pre_tokenizer[1]".
class Node {
 public:
  Node(const Json& value, std::string where) : value_(value), where_(std::move(where)) {}

  const Json& json() const { return value_; }
  const std::string& where() const { return where_; }
  Node child(const char* key) const {
    FERRY_CHECK(value_.is_object() && value_.contains(key), where_, ": missing \"", key, "\"");
    return Node(value_.at(key), where_ + "." + key);
  }

  bool has(const char* key) const {
    auto found = value_.find(key);
    return found != value_.end() && !found->is_null();
  }
  std::string type() const {
    FERRY_CHECK(value_.is_object() && value_.contains("type") && value_.at("type").is_string(), where_,
                ": expected an object with a \"type\", got ", value_.dump().substr(0, 200));
    return value_.at("type").get<std::string>();
  }
  std::string string(const char* key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    const Json& field = value_.at(key);
    FERRY_CHECK(field.is_string(), where_, ".", key, " must be a string, got ", field.dump());
    return field.get<std::string>();
  }
  bool boolean(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    const Json& field = value_.at(key);
    FERRY_CHECK(field.is_boolean(), where_, ".", key, " must be true or false, got ", field.dump());
    return field.get<bool>();
  }
  std::int64_t integer(const char* key, std::int64_t fallback) const {
    if (!has(key)) return fallback;
    const Json& field = value_.at(key);
    FERRY_CHECK(field.is_number_integer(), where_, ".", key, " must be an integer, got ", field.dump());
    return field.get<std::int64_t>();
  }
  std::vector<Node> list(const char* key) const {
    FERRY_CHECK(has(key) && value_.at(key).is_array(), where_, ".", key, " must be a list");
    std::vector<Node> items;
    const Json& array = value_.at(key);
    for (std::size_t i = 0; i < array.size(); ++i) {
      items.emplace_back(array[i], where_ + "." + key + "[" + std::to_string(i) + "]");
    }
    return items;
  }
  [[noreturn]] void unsupported(const std::string& what, const std::string& supported) const {
    throw Error(detail::concat(where_, ": ", what, " is not supported (supported: ", supported, ")"));
  }

 private:
  const Json& value_;
  std::string where_;
};

// {"String": "..."} or {"Regex": "..."}, as Split and Replace write their pattern.
Pattern read_pattern(const Node& node) {
  const Json& json = node.json();
  FERRY_CHECK(json.is_object() && json.size() == 1, node.where(), ": a pattern is {\"String\": ...} or ",
              "{\"Regex\": ...}, got ", json.dump());
  if (json.contains("String")) return Pattern::literal(json.at("String").get<std::string>());
  if (json.contains("Regex")) return Pattern::regex(json.at("Regex").get<std::string>());
  node.unsupported("pattern " + json.dump(), "String, Regex");
}

std::string single_character(const Node& node, const char* key, const std::string& fallback) {
  const std::string text = node.string(key, fallback);
  FERRY_CHECK(!text.empty() && utf8_length(static_cast<unsigned char>(text[0])) == text.size(), node.where(), ".",
              key, " must be one character, got '", text, "'");
  return text;
}

// --- pieces of text between the stages ----------------------------------------------------------

// A part of the text on its way through normalizer and pre-tokenizer: bytes that may no longer be
// the original's (prefixes added, spaces replaced), and for each byte, and one past the end, the
// original offset it came from, when offsets are asked for.
struct Piece {
  std::string_view text;
  const std::uint32_t* origin;
  std::uint32_t original_begin;
};

Piece sub_piece(const Piece& piece, std::size_t begin, std::size_t end) {
  return {piece.text.substr(begin, end - begin), piece.origin != nullptr ? piece.origin + begin : nullptr,
          piece.origin != nullptr ? piece.origin[begin] : piece.original_begin + static_cast<std::uint32_t>(begin)};
}

// The buffers of one encode call. Their addresses stay put while the call runs (a deque never
// moves its elements), so pieces can point into them; each thread reuses its own between calls.
class Scratch {
 public:
  std::string& new_text() {
    if (texts_used_ == texts_.size()) texts_.emplace_back();
    std::string& text = texts_[texts_used_++];
    text.clear();
    return text;
  }
  std::vector<std::uint32_t>& new_origin() {
    if (origins_used_ == origins_.size()) origins_.emplace_back();
    std::vector<std::uint32_t>& origin = origins_[origins_used_++];
    origin.clear();
    return origin;
  }
  void reset() { texts_used_ = origins_used_ = 0; }

  std::vector<Piece> pieces;
  std::vector<Piece> next_pieces;
  std::vector<Match> matches;
  std::vector<std::pair<Match, bool>> covering;
  std::vector<std::uint32_t> lengths;

 private:
  std::deque<std::string> texts_;
  std::deque<std::vector<std::uint32_t>> origins_;
  std::size_t texts_used_ = 0;
  std::size_t origins_used_ = 0;
};

Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

// prefix + piece, the prefix's bytes coming from where the piece starts.
Piece prepend(const Piece& piece, std::string_view prefix, Scratch& scratch) {
  std::string& text = scratch.new_text();
  text.reserve(prefix.size() + piece.text.size());
  text.append(prefix);
  text.append(piece.text);
  const std::uint32_t* origin = nullptr;
  if (piece.origin != nullptr) {
    std::vector<std::uint32_t>& bytes = scratch.new_origin();
    bytes.assign(prefix.size(), piece.origin[0]);
    bytes.insert(bytes.end(), piece.origin, piece.origin + piece.text.size() + 1);
    origin = bytes.data();
  }
  return {text, origin, piece.original_begin};
}

// --- splitting (the reference's NormalizedString::split and its Pattern::find_matches) ---------

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

Behavior read_behavior(const Node& node) {
  const std::string name = node.string("behavior", "");
  if (name == "Removed") return Behavior::kRemoved;
  if (name == "Isolated") return Behavior::kIsolated;
  if (name == "MergedWithPrevious") return Behavior::kMergedWithPrevious;
  if (name == "MergedWithNext") return Behavior::kMergedWithNext;
  if (name == "Contiguous") return Behavior::kContiguous;
  node.unsupported("behavior '" + name + "'", "Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous");
}

// The whole text as alternating (range, is_match) from a list of matches.
void cover_with_matches(std::string_view text, const std::vector<Match>& matches,
                        std::vector<std::pair<Match, bool>>& covering) {
  covering.clear();
  const auto size = static_cast<std::uint32_t>(text.size());
  std::uint32_t previous = 0;
  for (const Match& match : matches) {
    if (previous != match.first) covering.push_back({{previous, match.first}, false});
    covering.push_back({match, true});
    previous = match.second;
  }
  if (previous != size) covering.push_back({{previous, size}, false});
}

// The whole text as (range, is_match), each character for which `is_match` holds its own match.
template <typename Predicate>
void cover_with_characters(std::string_view text, Predicate is_match, std::vector<std::pair<Match, bool>>& covering) {
  covering.clear();
  std::uint32_t last_offset = 0;
  for (std::size_t at = 0; at < text.size();) {
    const DecodedChar decoded = decode_utf8(text, at);
    const auto begin = static_cast<std::uint32_t>(at), end = static_cast<std::uint32_t>(at + decoded.bytes);
    if (is_match(decoded.code_point)) {
      if (last_offset < begin) covering.push_back({{last_offset, begin}, false});
      covering.push_back({{begin, end}, true});
      last_offset = end;
    }
    at = end;
  }
  if (text.size() > last_offset) covering.push_back({{last_offset, static_cast<std::uint32_t>(text.size())}, false});
}

void invert(std::vector<std::pair<Match, bool>>& covering) {
  for (auto& entry : covering) entry.second = !entry.second;
}

// Isolated pieces straight from the matches: each match and each stretch between matches.
void split_isolated(const Piece& piece, const std::vector<Match>& matches, std::vector<Piece>& out) {
  std::uint32_t previous = 0;
  for (const Match& match : matches) {
    if (previous < match.first) out.push_back(sub_piece(piece, previous, match.first));
    if (match.first < match.second) out.push_back(sub_piece(piece, match.first, match.second));
    previous = match.second;
  }
  if (previous < piece.text.size()) out.push_back(sub_piece(piece, previous, piece.text.size()));
}

// The pieces `behavior` makes of a covering; empty ones are dropped, as the reference drops them.
void split_piece(const Piece& piece, const std::vector<std::pair<Match, bool>>& covering, Behavior behavior,
                 std::vector<Piece>& out) {
  thread_local std::vector<std::pair<Match, bool>> kept;  // (range, removed)
  kept.clear();
  bool previous_match = false;
  switch (behavior) {
    case Behavior::kIsolated:
      for (const auto& [range, matched] : covering) kept.push_back({range, false});
      break;
    case Behavior::kRemoved:
      kept = covering;
      break;
    case Behavior::kContiguous:
      for (const auto& [range, matched] : covering) {
        if (matched == previous_match && !kept.empty()) {
          kept.back().first.second = range.second;
        } else {
          kept.push_back({range, false});
        }
        previous_match = matched;
      }
      break;
    case Behavior::kMergedWithPrevious:
      for (const auto& [range, matched] : covering) {
        if (matched && !previous_match && !kept.empty()) {
          kept.back().first.second = range.second;
        } else {
          kept.push_back({range, false});
        }
        previous_match = matched;
      }
      break;
    case Behavior::kMergedWithNext:
      for (auto it = covering.rbegin(); it != covering.rend(); ++it) {
        const auto& [range, matched] = *it;
        if (matched && !previous_match && !kept.empty()) {
          kept.back().first.first = range.first;
        } else {
          kept.push_back({range, false});
        }
        previous_match = matched;
      }
      std::reverse(kept.begin(), kept.end());
      break;
  }
  for (const auto& [range, removed] : kept) {
    if (!removed && range.second > range.first) out.push_back(sub_piece(piece, range.first, range.second));
  }
}

// --- normalizers --------------------------------------------------------------------------------

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  // origin, when given, is kept parallel to text (one entry per byte and one past the end).
  virtual void normalize(std::string& text, std::vector<std::uint32_t>* origin) const = 0;
};

class UnicodeNormalizer final : public Normalizer {
 public:
  explicit UnicodeNormalizer(NormalForm form) : form_(form) {}
  void normalize(std::string& text, std::vector<std::uint32_t>* origin) const override {
    tokenizer::normalize(form_, text, origin);
  }

 private:
  NormalForm form_;
};

class LowercaseNormalizer final : public Normalizer {
 public:
  void normalize(std::string& text, std::vector<std::uint32_t>* origin) const override { lowercase(text, origin); }
};

class PrependNormalizer final : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  void normalize(std::string& text, std::vector<std::uint32_t>* origin) const override {
    if (text.empty()) return;
    text.insert(0, prefix_);
    if (origin != nullptr) origin->insert(origin->begin(), prefix_.size(), (*origin)[0]);
  }

 private:
  std::string prefix_;
};

// Rebuilds text (and origin) from kept byte ranges and inserted strings.
class Rebuild {
 public:
  Rebuild(const std::string& text, const std::vector<std::uint32_t>* origin) : text_(text), origin_(origin) {
    out_.reserve(text.size());
    if (origin_ != nullptr) out_origin_.reserve(text.size() + 1);
  }
  void keep(std::size_t begin, std::size_t end) {
    out_.append(text_, begin, end - begin);
    if (origin_ != nullptr) out_origin_.insert(out_origin_.end(), origin_->begin() + begin, origin_->begin() + end);
  }
  void insert(std::string_view bytes, std::size_t from) {
    out_.append(bytes);
    if (origin_ != nullptr) out_origin_.insert(out_origin_.end(), bytes.size(), (*origin_)[from]);
  }
  void finish(std::string& text, std::vector<std::uint32_t>* origin) {
    if (origin != nullptr) {
      out_origin_.push_back(origin->back());
      *origin = std::move(out_origin_);
    }
    text = std::move(out_);
  }

 private:
  const std::string& text_;
  const std::vector<std::uint32_t>* origin_;
  std::string out_;
  std::vector<std::uint32_t> out_origin_;
};

class ReplaceNormalizer final : public Normalizer {
 public:
  ReplaceNormalizer(Pattern pattern, std::string content) : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void normalize(std::string& text, std::vector<std::uint32_t>* origin) const override {
    std::vector<Match> matches;
    pattern_.find_all(text, matches);
    if (matches.empty()) return;
    Rebuild rebuild(text, origin);
    std::size_t previous = 0;
    for (const Match& match : matches) {
      rebuild.keep(previous, match.first);
      rebuild.insert(content_, match.first);
      previous = match.second;
    }
    rebuild.keep(previous, text.size());
    rebuild.finish(text, origin);
  }

 private:
  Pattern pattern_;
  std::string content_;
};

class StripNormalizer final : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  void normalize(std::string& text, std::vector<std::uint32_t>* origin) const override {
    std::size_t begin = 0, end = text.size();
    if (left_) {
      while (begin < end) {
        const DecodedChar decoded = decode_utf8(text, begin);
        if (!is_whitespace(decoded.code_point)) break;
        begin += decoded.bytes;
      }
    }
    if (right_) {
      while (end > begin) {
        std::size_t start = end - 1;
        while (start > begin && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) --start;
        if (!is_whitespace(decode_utf8(text, start).code_point)) break;
        end = start;
      }
    }
    if (begin == 0 && end == text.size()) return;
    Rebuild rebuild(text, origin);
    rebuild.keep(begin, end);
    rebuild.finish(text, origin);
  }

 private:
  bool left_, right_;
};

class StripAccentsNormalizer final : public Normalizer {
 public:
  void normalize(std::string& text, std::vector<std::uint32_t>* origin) const override {
    Rebuild rebuild(text, origin);
    for (std::size_t at = 0; at < text.size();) {
      const DecodedChar decoded = decode_utf8(text, at);
      if (!is_nonspacing_mark(decoded.code_point)) rebuild.keep(at, at + decoded.bytes);
      at += decoded.bytes;
    }
    rebuild.finish(text, origin);
  }
};

class NormalizerSequence final : public Normalizer {
 public:
  explicit NormalizerSequence(std::vector<std::unique_ptr<Normalizer>> steps) : steps_(std::move(steps)) {}
  void normalize(std::string& text, std::vector<std::uint32_t>* origin) const override {
    for (const auto& step : steps_) step->normalize(text, origin);
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> steps_;
};

std::unique_ptr<Normalizer> read_normalizer(const Node& node) {
  const std::string type = node.type();
  if (type == "NFC") return std::make_unique<UnicodeNormalizer>(NormalForm::kNfc);
  if (type == "NFD") return std::make_unique<UnicodeNormalizer>(NormalForm::kNfd);
  if (type == "NFKC") return std::make_unique<UnicodeNormalizer>(NormalForm::kNfkc);
  if (type == "NFKD") return std::make_unique<UnicodeNormalizer>(NormalForm::kNfkd);
  if (type == "Lowercase") return std::make_unique<LowercaseNormalizer>();
  if (type == "Prepend") return std::make_unique<PrependNormalizer>(node.string("prepend", ""));
  if (type == "Replace") {
    return std::make_unique<ReplaceNormalizer>(read_pattern(node.child("pattern")), node.string("content", ""));
  }
  if (type == "Strip") {
    return std::make_unique<StripNormalizer>(node.boolean("strip_left", true), node.boolean("strip_right", true));
  }
  if (type == "StripAccents") return std::make_unique<StripAccentsNormalizer>();
  if (type == "Sequence") {
    std::vector<std::unique_ptr<Normalizer>> steps;
    for (const Node& step : node.list("normalizers")) steps.push_back(read_normalizer(step));
    return std::make_unique<NormalizerSequence>(std::move(steps));
  }
  node.unsupported("normalizer type '" + type + "'",
                   "NFC, NFD, NFKC, NFKD, Lowercase, Prepend, Replace, Strip, StripAccents, Sequence");
}

// --- pre-tokenizers -----------------------------------------------------------------------------

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Replaces pieces by what this step makes of each of them, in order.
  virtual void pre_tokenize(std::vector<Piece>& pieces, Scratch& scratch) const = 0;
  // A ByteLevel step: the model then reads the pieces' bytes through GPT-2's table.
  virtual bool byte_level() const { return false; }
  // Whether the step looks at where a piece starts in the original text (Metaspace's "first").
  virtual bool uses_original_offsets() const { return false; }
};

// Applies a per-piece step to every piece.
template <typename Step>
void for_each_piece(std::vector<Piece>& pieces, Scratch& scratch, Step step) {
  scratch.next_pieces.clear();
  for (const Piece& piece : pieces) step(piece, scratch.next_pieces);
  pieces.swap(scratch.next_pieces);
}

class ByteLevelPreTokenizer final : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, bool use_regex)
      : add_prefix_space_(add_prefix_space), use_regex_(use_regex), regex_(Pattern::regex(kGpt2Pattern)) {}
  void pre_tokenize(std::vector<Piece>& pieces, Scratch& scratch) const override {
    for_each_piece(pieces, scratch, [&](const Piece& original, std::vector<Piece>& out) {
      const Piece piece = add_prefix_space_ && original.text[0] != ' ' ? prepend(original, " ", scratch) : original;
      if (!use_regex_) {
        out.push_back(piece);
        return;
      }
      scratch.matches.clear();
      regex_.find_all(piece.text, scratch.matches);
      split_isolated(piece, scratch.matches, out);
    });
  }
  bool byte_level() const override { return true; }

 private:
  bool add_prefix_space_, use_regex_;
  Pattern regex_;
};

class SplitPreTokenizer final : public PreTokenizer {
 public:
  SplitPreTokenizer(Pattern pattern, Behavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  void pre_tokenize(std::vector<Piece>& pieces, Scratch& scratch) const override {
    for_each_piece(pieces, scratch, [&](const Piece& piece, std::vector<Piece>& out) {
      scratch.matches.clear();
      pattern_.find_all(piece.text, scratch.matches);
      if (behavior_ == Behavior::kIsolated) {
        split_isolated(piece, scratch.matches, out);  // inverting changes nothing when all is kept
        return;
      }
      cover_with_matches(piece.text, scratch.matches, scratch.covering);
      if (invert_) invert(scratch.covering);
      split_piece(piece, scratch.covering, behavior_, out);
    });
  }

 private:
  Pattern pattern_;
  Behavior behavior_;
  bool invert_;
};

class MetaspacePreTokenizer final : public PreTokenizer {
 public:
  enum class Prepend { kAlways, kFirst, kNever };
  MetaspacePreTokenizer(std::string replacement, Prepend scheme, bool split)
      : replacement_(std::move(replacement)), replacement_char_(decode_utf8(replacement_, 0).code_point),
        scheme_(scheme), split_(split) {}
  void pre_tokenize(std::vector<Piece>& pieces, Scratch& scratch) const override {
    for_each_piece(pieces, scratch, [&](const Piece& original, std::vector<Piece>& out) {
      Piece piece = replace_spaces(original, scratch);
      const bool starts_with_replacement = piece.text.compare(0, replacement_.size(), replacement_) == 0;
      if (!starts_with_replacement &&
          (scheme_ == Prepend::kAlways || (scheme_ == Prepend::kFirst && piece.original_begin == 0))) {
        piece = prepend(piece, replacement_, scratch);
      }
      if (!split_) {
        out.push_back(piece);
        return;
      }
      cover_with_characters(piece.text, [&](char32_t c) { return c == replacement_char_; }, scratch.covering);
      split_piece(piece, scratch.covering, Behavior::kMergedWithNext, out);
    });
  }
  bool uses_original_offsets() const override { return scheme_ == Prepend::kFirst; }

 private:
  Piece replace_spaces(const Piece& piece, Scratch& scratch) const {
    if (piece.text.find(' ') == std::string_view::npos) return piece;
    std::string& text = scratch.new_text();
    std::vector<std::uint32_t>* origin = piece.origin != nullptr ? &scratch.new_origin() : nullptr;
    for (std::size_t i = 0; i < piece.text.size(); ++i) {
      const bool space = piece.text[i] == ' ';
      if (space) {
        text += replacement_;
      } else {
        text.push_back(piece.text[i]);
      }
      if (origin != nullptr) origin->insert(origin->end(), space ? replacement_.size() : 1, piece.origin[i]);
    }
    if (origin != nullptr) origin->push_back(piece.origin[piece.text.size()]);
    return {text, origin != nullptr ? origin->data() : nullptr, piece.original_begin};
  }

  std::string replacement_;
  char32_t replacement_char_;
  Prepend scheme_;
  bool split_;
};

// Splits on characters: Digits (numeric characters, each alone or runs together) and
// WhitespaceSplit (whitespace removed).
template <typename Predicate>
class CharacterSplitPreTokenizer final : public PreTokenizer {
 public:
  CharacterSplitPreTokenizer(Predicate predicate, Behavior behavior) : predicate_(predicate), behavior_(behavior) {}
  void pre_tokenize(std::vector<Piece>& pieces, Scratch& scratch) const override {
    for_each_piece(pieces, scratch, [&](const Piece& piece, std::vector<Piece>& out) {
      cover_with_characters(piece.text, predicate_, scratch.covering);
      split_piece(piece, scratch.covering, behavior_, out);
    });
  }

 private:
  Predicate predicate_;
  Behavior behavior_;
};

template <typename Predicate>
std::unique_ptr<PreTokenizer> character_split(Predicate predicate, Behavior behavior) {
  return std::make_unique<CharacterSplitPreTokenizer<Predicate>>(predicate, behavior);
}

class PreTokenizerSequence final : public PreTokenizer {
 public:
  explicit PreTokenizerSequence(std::vector<std::unique_ptr<PreTokenizer>> steps) : steps_(std::move(steps)) {}
  void pre_tokenize(std::vector<Piece>& pieces, Scratch& scratch) const override {
    for (const auto& step : steps_) step->pre_tokenize(pieces, scratch);
  }
  bool byte_level() const override {
    return std::any_of(steps_.begin(), steps_.end(), [](const auto& step) { return step->byte_level(); });
  }
  bool uses_original_offsets() const override {
    return std::any_of(steps_.begin(), steps_.end(), [](const auto& step) { return step->uses_original_offsets(); });
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> steps_;
};

MetaspacePreTokenizer::Prepend read_prepend_scheme(const Node& node) {
  if (!node.has("prepend_scheme")) {
    return node.boolean("add_prefix_space", true) ? MetaspacePreTokenizer::Prepend::kAlways
                                                   : MetaspacePreTokenizer::Prepend::kNever;
  }
  const std::string scheme = node.string("prepend_scheme", "always");
  if (scheme == "always") return MetaspacePreTokenizer::Prepend::kAlways;
  if (scheme == "first") return MetaspacePreTokenizer::Prepend::kFirst;
  if (scheme == "never") return MetaspacePreTokenizer::Prepend::kNever;
  node.unsupported("prepend_scheme '" + scheme + "'", "always, first, never");
}

std::unique_ptr<PreTokenizer> read_pre_tokenizer(const Node& node) {
  const std::string type = node.type();
  if (type == "ByteLevel") {
    return std::make_unique<ByteLevelPreTokenizer>(node.boolean("add_prefix_space", true), node.boolean("use_regex", true));
  }
  if (type == "Split") {
    return std::make_unique<SplitPreTokenizer>(read_pattern(node.child("pattern")), read_behavior(node),
                                               node.boolean("invert", false));
  }
  if (type == "Metaspace") {
    return std::make_unique<MetaspacePreTokenizer>(single_character(node, "replacement", "\u2581"),
                                                   read_prepend_scheme(node), node.boolean("split", true));
  }
  if (type == "Digits") {
    return character_split(is_numeric,
                           node.boolean("individual_digits", false) ? Behavior::kIsolated : Behavior::kContiguous);
  }
  if (type == "WhitespaceSplit") return character_split(is_whitespace, Behavior::kRemoved);
  if (type == "Whitespace") {
    // \w+|[^\w\s]+, the matches kept and the rest removed.
    return std::make_unique<SplitPreTokenizer>(Pattern::regex(R"(\w+|[^\w\s]+)"), Behavior::kRemoved, true);
  }
  if (type == "Sequence") {
    std::vector<std::unique_ptr<PreTokenizer>> steps;
    const std::vector<Node> items = node.list("pretokenizers");
    for (std::size_t i = 0; i < items.size(); ++i) {
      steps.push_back(read_pre_tokenizer(items[i]));
      FERRY_CHECK(!steps.back()->byte_level() || i + 1 == items.size(), items[i].where(),
                  ": a ByteLevel pre-tokenizer before other pre-tokenizers is not supported (valid: ByteLevel last, ",
                  "as GPT-2, Llama-3 and Qwen2 have it)");
    }
    return std::make_unique<PreTokenizerSequence>(std::move(steps));
  }
  node.unsupported("pre-tokenizer type '" + type + "'",
                   "ByteLevel, Split, Metaspace, Digits, Whitespace, WhitespaceSplit, Sequence");
}

// --- decoders -----------------------------------------------------------------------------------

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void decode_chain(std::vector<std::string>& tokens) const = 0;
};

class ByteLevelDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string bytes;
    for (const std::string& token : tokens) {
      const std::size_t before = bytes.size();
      bool mapped = true;
      for (std::size_t at = 0; at < token.size() && mapped;) {
        const DecodedChar decoded = decode_utf8(token, at);
        const int byte = byte_level_byte(decoded.code_point);
        mapped = byte >= 0;
        bytes.push_back(static_cast<char>(byte));
        at += decoded.bytes;
      }
      if (!mapped) {
        bytes.resize(before);
        bytes += token;
      }
    }
    tokens.assign(1, from_utf8_lossy(bytes));
  }
};

class MetaspaceDecoder final : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, bool strips_first) : replacement_(std::move(replacement)), strips_first_(strips_first) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      std::string decoded;
      const std::string& token = tokens[i];
      for (std::size_t at = 0; at < token.size();) {
        if (token.compare(at, replacement_.size(), replacement_) == 0) {
          if (i != 0 || !strips_first_) decoded.push_back(' ');
          at += replacement_.size();
        } else {
          decoded.push_back(token[at++]);
        }
      }
      tokens[i] = std::move(decoded);
    }
  }

 private:
  std::string replacement_;
  bool strips_first_;
};

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

class ByteFallbackDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::vector<std::string> out;
    std::string bytes;
    const auto flush = [&] {
      if (bytes.empty()) return;
      if (first_invalid_utf8(bytes) == bytes.size()) {
        out.push_back(bytes);
      } else {
        for (std::size_t i = 0; i < bytes.size(); ++i) out.emplace_back("\xEF\xBF\xBD");
      }
      bytes.clear();
    };
    for (std::string& token : tokens) {
      const bool is_byte = token.size() == 6 && token.compare(0, 3, "<0x") == 0 && token[5] == '>' &&
                           hex_value(token[3]) >= 0 && hex_value(token[4]) >= 0;
      if (is_byte) {
        bytes.push_back(static_cast<char>(hex_value(token[3]) * 16 + hex_value(token[4])));
      } else {
        flush();
        out.push_back(std::move(token));
      }
    }
    flush();
    tokens = std::move(out);
  }
};

class FuseDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string joined;
    for (const std::string& token : tokens) joined += token;
    tokens.assign(1, std::move(joined));
  }
};

class StripDecoder final : public Decoder {
 public:
  StripDecoder(char32_t content, std::size_t start, std::size_t stop) : content_(content), start_(start), stop_(stop) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (std::string& token : tokens) {
      std::vector<std::size_t> starts;  // each character's first byte
      for (std::size_t at = 0; at < token.size(); at += utf8_length(static_cast<unsigned char>(token[at]))) {
        starts.push_back(at);
      }
      const auto character = [&](std::size_t i) { return decode_utf8(token, starts[i]).code_point; };
      std::size_t start_cut = 0;
      for (std::size_t i = 0; i < std::min(start_, starts.size()) && character(i) == content_; ++i) start_cut = i + 1;
      std::size_t stop_cut = starts.size();
      for (std::size_t i = 0; i < stop_ && i < starts.size(); ++i) {
        const std::size_t index = starts.size() - i - 1;
        if (character(index) != content_) break;
        stop_cut = index;
      }
      if (stop_cut < start_cut) stop_cut = start_cut;
      const std::size_t begin = start_cut < starts.size() ? starts[start_cut] : token.size();
      const std::size_t end = stop_cut < starts.size() ? starts[stop_cut] : token.size();
      token = token.substr(begin, end - begin);
    }
  }

 private:
  char32_t content_;
  std::size_t start_, stop_;
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(Pattern pattern, std::string content) : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::vector<Match> matches;
    for (std::string& token : tokens) {
      matches.clear();
      pattern_.find_all(token, matches);
      if (matches.empty()) continue;
      std::string replaced;
      std::size_t previous = 0;
      for (const Match& match : matches) {
        replaced.append(token, previous, match.first - previous);
        replaced += content_;
        previous = match.second;
      }
      replaced.append(token, previous, std::string::npos);
      token = std::move(replaced);
    }
  }

 private:
  Pattern pattern_;
  std::string content_;
};

class DecoderSequence final : public Decoder {
 public:
  explicit DecoderSequence(std::vector<std::unique_ptr<Decoder>> steps) : steps_(std::move(steps)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (const auto& step : steps_) step->decode_chain(tokens);
  }

 private:
  std::vector<std::unique_ptr<Decoder>> steps_;
};

std::unique_ptr<Decoder> read_decoder(const Node& node) {
  const std::string type = node.type();
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "Metaspace") {
    return std::make_unique<MetaspaceDecoder>(single_character(node, "replacement", "\u2581"),
                                              read_prepend_scheme(node) != MetaspacePreTokenizer::Prepend::kNever);
  }
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "Strip") {
    const std::string content = single_character(node, "content", " ");
    return std::make_unique<StripDecoder>(decode_utf8(content, 0).code_point,
                                          static_cast<std::size_t>(node.integer("start", 0)),
                                          static_cast<std::size_t>(node.integer("stop", 0)));
  }
  if (type == "Replace") {
    return std::make_unique<ReplaceDecoder>(read_pattern(node.child("pattern")), node.string("content", ""));
  }
  if (type == "Sequence") {
    std::vector<std::unique_ptr<Decoder>> steps;
    for (const Node& step : node.list("decoders")) steps.push_back(read_decoder(step));
    return std::make_unique<DecoderSequence>(std::move(steps));
  }
  node.unsupported("decoder type '" + type + "'", "ByteLevel, Metaspace, ByteFallback, Fuse, Strip, Replace, Sequence");
}

// --- post-processors ----------------------------------------------------------------------------

// What add_special_tokens=True wraps a single sequence in: ids before and after it.
struct SpecialTokenFrame {
  std::vector<std::int32_t> before, after;
};

// A SpecialToken entry of a TemplateProcessing ("<s>") to the ids its special_tokens table gives.
std::vector<std::int32_t> template_token_ids(const Node& processor, const std::string& name) {
  const Node table = processor.child("special_tokens");
  FERRY_CHECK(table.json().contains(name), table.where(), ": no entry for the template's special token '", name, "'");
  const Json& entry = table.json().at(name);
  FERRY_CHECK(entry.contains("ids") && entry.at("ids").is_array(), table.where(), ".", name, ": missing \"ids\"");
  return entry.at("ids").get<std::vector<std::int32_t>>();
}

void read_post_processor(const Node& node, SpecialTokenFrame& frame) {
  const std::string type = node.type();
  if (type == "ByteLevel") return;
  if (type == "TemplateProcessing") {
    bool seen_sequence = false;
    for (const Node& piece : node.list("single")) {
      const Json& json = piece.json();
      if (json.contains("Sequence")) {
        seen_sequence = true;
      } else if (json.contains("SpecialToken")) {
        const std::vector<std::int32_t> ids =
            template_token_ids(node, json.at("SpecialToken").at("id").get<std::string>());
        auto& side = seen_sequence ? frame.after : frame.before;
        side.insert(side.end(), ids.begin(), ids.end());
      } else {
        piece.unsupported("template piece " + json.dump(), "Sequence, SpecialToken");
      }
    }
    return;
  }
  if (type == "RobertaProcessing" || type == "BertProcessing") {
    const Json& cls = node.json().at("cls");
    const Json& sep = node.json().at("sep");
    frame.before.push_back(cls.at(1).get<std::int32_t>());
    frame.after.push_back(sep.at(1).get<std::int32_t>());
    return;
  }
  if (type == "Sequence") {
    for (const Node& step : node.list("processors")) read_post_processor(step, frame);
    return;
  }
  node.unsupported("post-processor type '" + type + "'",
                   "TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing, Sequence");
}

// --- added tokens -------------------------------------------------------------------------------

struct AddedToken {
  std::string content;
  std::string pattern;  // what is matched: the content, normalized for a normalized token
  std::int32_t id = -1;
  bool single_word = false, lstrip = false, rstrip = false, normalized = true, special = false;
};

// Finds added tokens in text as the reference's AddedVocabulary::find_matches: leftmost-longest
// non-overlapping matches (its Aho-Corasick automaton's order), where a single_word token must
// not touch a word character on either side, and lstrip / rstrip tokens take the whitespace
// before / after them along.
class AddedTokenMatcher {
 public:
  void add(const AddedToken& token, std::size_t index) {
    if (token.pattern.empty()) return;
    std::int32_t node = 0;
    for (char c : token.pattern) {
      const auto byte = static_cast<unsigned char>(c);
      auto& edges = nodes_[node].edges;
      auto found = std::find_if(edges.begin(), edges.end(), [&](const auto& edge) { return edge.first == byte; });
      if (found == edges.end()) {
        edges.push_back({byte, static_cast<std::int32_t>(nodes_.size())});
        nodes_.emplace_back();
        node = static_cast<std::int32_t>(nodes_.size()) - 1;
      } else {
        node = found->second;
      }
    }
    if (nodes_[node].token < 0) nodes_[node].token = static_cast<std::int32_t>(index);
    first_bytes_[static_cast<unsigned char>(token.pattern[0])] = true;
    empty_ = false;
  }
  bool empty() const { return empty_; }

  struct Found {
    std::uint32_t begin, end;
    std::int32_t token;  // index into the tokens; -1 for text between tokens
  };
  // The whole text as text and token segments, in order.
  void split(std::string_view text, const std::vector<AddedToken>& tokens, std::vector<Found>& out) const {
    out.clear();
    std::uint32_t start_offset = 0;
    std::size_t at = 0;
    while (at < text.size()) {
      if (!first_bytes_[static_cast<unsigned char>(text[at])]) {
        ++at;
        continue;
      }
      std::int32_t node = 0, longest_token = -1;
      std::size_t longest_end = 0;
      for (std::size_t i = at; i < text.size(); ++i) {
        node = child(node, static_cast<unsigned char>(text[i]));
        if (node < 0) break;
        if (nodes_[node].token >= 0) {
          longest_token = nodes_[node].token;
          longest_end = i + 1;
        }
      }
      if (longest_token < 0) {
        ++at;
        continue;
      }
      std::size_t begin = at, end = longest_end;
      at = longest_end;
      const AddedToken& token = tokens[longest_token];
      if (token.single_word) {
        const bool space_before = begin == 0 || !is_word_character(last_character(text.substr(0, begin)));
        const bool space_after = end == text.size() || !is_word_character(decode_utf8(text, end).code_point);
        if (!space_before || !space_after) continue;
      }
      if (token.lstrip) begin = std::max<std::size_t>(whitespace_run_start(text.substr(0, begin)), start_offset);
      if (token.rstrip) end += whitespace_run_length(text.substr(end));
      if (start_offset < begin) out.push_back({start_offset, static_cast<std::uint32_t>(begin), -1});
      out.push_back({static_cast<std::uint32_t>(begin), static_cast<std::uint32_t>(end), longest_token});
      start_offset = static_cast<std::uint32_t>(end);
    }
    if (start_offset != text.size()) out.push_back({start_offset, static_cast<std::uint32_t>(text.size()), -1});
  }

 private:
  struct TrieNode {
    std::vector<std::pair<unsigned char, std::int32_t>> edges;
    std::int32_t token = -1;
  };
  std::int32_t child(std::int32_t node, unsigned char byte) const {
    for (const auto& [edge, target] : nodes_[node].edges) {
      if (edge == byte) return target;
    }
    return -1;
  }
  static char32_t last_character(std::string_view text) {
    std::size_t start = text.size() - 1;
    while (start > 0 && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) --start;
    return decode_utf8(text, start).code_point;
  }
  static std::size_t whitespace_run_start(std::string_view text) {
    std::size_t start = text.size();
    while (start > 0) {
      std::size_t previous = start - 1;
      while (previous > 0 && (static_cast<unsigned char>(text[previous]) & 0xC0) == 0x80) --previous;
      if (!is_whitespace(decode_utf8(text, previous).code_point)) break;
      start = previous;
    }
    return start;
  }
  static std::size_t whitespace_run_length(std::string_view text) {
    std::size_t length = 0;
    while (length < text.size()) {
      const DecodedChar decoded = decode_utf8(text, length);
      if (!is_whitespace(decoded.code_point)) break;
      length += decoded.bytes;
    }
    return length;
  }

  std::vector<TrieNode> nodes_ = std::vector<TrieNode>(1);
  std::array<bool, 256> first_bytes_{};
  bool empty_ = true;
};

// --- the tokenizer ------------------------------------------------------------------------------

class HfTokenizer final : public Tokenizer {
 public:
  HfTokenizer(const Json& root, const std::string& path);

  void encode(std::string_view text, std::vector<std::int32_t>& ids, std::vector<TokenSpan>* spans) const override;
  std::vector<std::int64_t> encode_with_special_tokens(std::string_view text) const override;
  std::string decode(const std::vector<std::int64_t>& ids, bool skip_special_tokens) const override;
  std::int64_t vocab_size() const override { return vocab_size_; }
  std::optional<std::int64_t> token_to_id(std::string_view token) const override;
  std::string id_to_token(std::int64_t id) const override;
  std::string kind() const override { return "tokenizer.json (BPE)"; }

 private:
  void encode_segment(std::string_view text, std::uint32_t original_begin, bool track, Scratch& scratch,
                      Bpe::Scratch& model_scratch, std::vector<std::int32_t>& ids, std::vector<TokenSpan>* spans) const;
  void encode_piece(const Piece& piece, Scratch& scratch, Bpe::Scratch& model_scratch, std::vector<std::int32_t>& ids,
                    std::vector<TokenSpan>* spans) const;
  // The string decoding starts from: the added token's (normalized) form, else the model's.
  const std::string* token_string(std::int64_t id) const;

  std::string path_;
  std::unique_ptr<Normalizer> normalizer_;
  std::unique_ptr<PreTokenizer> pre_tokenizer_;
  std::unique_ptr<Bpe> model_;
  std::unique_ptr<Decoder> decoder_;
  SpecialTokenFrame frame_;
  std::vector<AddedToken> added_;
  std::vector<std::int32_t> added_by_id_;  // id -> index into added_, -1 when not an added token
  std::set<std::string> special_contents_;
  AddedTokenMatcher original_matcher_;    // tokens matched in the text as given
  AddedTokenMatcher normalized_matcher_;  // tokens matched in the normalized text
  bool metaspace_first_with_normalizer_ = false;
  std::int64_t vocab_size_ = 0;
};

std::vector<std::pair<std::string, std::string>> read_merges(const Node& model) {
  std::vector<std::pair<std::string, std::string>> merges;
  if (!model.has("merges")) return merges;
  const Json& list = model.json().at("merges");
  FERRY_CHECK(list.is_array(), model.where(), ".merges must be a list");
  merges.reserve(list.size());
  for (std::size_t i = 0; i < list.size(); ++i) {
    const Json& merge = list[i];
    if (merge.is_string()) {
      const std::string text = merge.get<std::string>();
      const std::size_t space = text.find(' ');
      FERRY_CHECK(space != std::string::npos && text.find(' ', space + 1) == std::string::npos, model.where(),
                  ".merges[", i, "] is '", text, "': a merge is two tokens separated by one space");
      merges.emplace_back(text.substr(0, space), text.substr(space + 1));
    } else {
      FERRY_CHECK(merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string(), model.where(),
                  ".merges[", i, "] is ", merge.dump(), ": a merge is \"a b\" or [\"a\", \"b\"]");
      merges.emplace_back(merge[0].get<std::string>(), merge[1].get<std::string>());
    }
  }
  return merges;
}

std::unique_ptr<Bpe> read_model(const Node& model, bool byte_level, const std::string& path) {
  const std::string type = model.has("type") ? model.type() : (model.has("merges") ? "BPE" : "");
  if (type != "BPE") model.unsupported("model type '" + type + "'", "BPE");
  FERRY_CHECK(model.has("vocab") && model.json().at("vocab").is_object(), model.where(), ".vocab must be an object");
  std::vector<std::string> tokens;
  for (const auto& [token, id_json] : model.json().at("vocab").items()) {
    FERRY_CHECK(id_json.is_number_integer() && id_json.get<std::int64_t>() >= 0, model.where(), ".vocab['", token,
                "'] must be an id of 0 or more, got ", id_json.dump());
    const auto id = static_cast<std::size_t>(id_json.get<std::int64_t>());
    if (id >= tokens.size()) tokens.resize(id + 1);
    tokens[id] = token;
  }
  BpeOptions options;
  if (model.has("unk_token")) options.unk_token = model.string("unk_token", "");
  options.continuing_subword_prefix = model.string("continuing_subword_prefix", "");
  options.end_of_word_suffix = model.string("end_of_word_suffix", "");
  options.fuse_unk = model.boolean("fuse_unk", false);
  options.byte_fallback = model.boolean("byte_fallback", false);
  options.ignore_merges = model.boolean("ignore_merges", false);
  options.byte_level = byte_level;
  return std::make_unique<Bpe>(std::move(tokens), read_merges(model), std::move(options), path);
}

HfTokenizer::HfTokenizer(const Json& root, const std::string& path) : path_(path) {
  const Node top(root, path);
  if (top.has("normalizer")) normalizer_ = read_normalizer(top.child("normalizer"));
  if (top.has("pre_tokenizer")) pre_tokenizer_ = read_pre_tokenizer(top.child("pre_tokenizer"));
  if (top.has("decoder")) decoder_ = read_decoder(top.child("decoder"));
  FERRY_CHECK(top.has("model"), path, ": no \"model\"");
  model_ = read_model(top.child("model"), pre_tokenizer_ != nullptr && pre_tokenizer_->byte_level(), path);
  metaspace_first_with_normalizer_ =
      normalizer_ != nullptr && pre_tokenizer_ != nullptr && pre_tokenizer_->uses_original_offsets();
  vocab_size_ = model_->size();

  if (top.has("added_tokens")) {
    for (const Node& entry : top.list("added_tokens")) {
      AddedToken token;
      token.content = entry.string("content", "");
      token.id = static_cast<std::int32_t>(entry.integer("id", -1));
      FERRY_CHECK(token.id >= 0, entry.where(), ": an added token needs an id of 0 or more");
      token.single_word = entry.boolean("single_word", false);
      token.lstrip = entry.boolean("lstrip", false);
      token.rstrip = entry.boolean("rstrip", false);
      token.special = entry.boolean("special", false);
      token.normalized = entry.boolean("normalized", !token.special);
      if (token.content.empty()) continue;
      // As the reference: a token the model has already keeps the model's id.
      const std::int32_t in_model = model_->token_to_id(token.content);
      if (in_model >= 0) token.id = in_model;
      token.pattern = token.content;
      if (token.normalized && normalizer_ != nullptr) normalizer_->normalize(token.pattern, nullptr);
      if (token.special) special_contents_.insert(token.content);
      vocab_size_ = std::max<std::int64_t>(vocab_size_, token.id + 1);
      added_.push_back(std::move(token));
    }
  }
  added_by_id_.assign(static_cast<std::size_t>(vocab_size_), -1);
  for (std::size_t i = 0; i < added_.size(); ++i) {
    added_by_id_[added_[i].id] = static_cast<std::int32_t>(i);
    (added_[i].normalized ? normalized_matcher_ : original_matcher_).add(added_[i], i);
  }
  if (top.has("post_processor")) read_post_processor(top.child("post_processor"), frame_);
  for (const std::vector<std::int32_t>* side : {&frame_.before, &frame_.after}) {
    for (std::int32_t id : *side) {
      FERRY_CHECK(id >= 0 && id < vocab_size_, path, ": the post-processor adds token id ", id,
                  ", outside the vocabulary of ", vocab_size_);
    }
  }
}

void HfTokenizer::encode(std::string_view text, std::vector<std::int32_t>& ids, std::vector<TokenSpan>* spans) const {
  const std::size_t invalid = first_invalid_utf8(text);
  FERRY_CHECK(invalid == text.size(), "cannot tokenize text that is not valid UTF-8: byte ", invalid, " of ",
              text.size(), " (0x", std::hex, static_cast<int>(static_cast<unsigned char>(text[invalid])), ") starts no ",
              "UTF-8 character");
  FERRY_CHECK(text.size() < UINT32_MAX, "cannot tokenize a text of ", text.size(), " bytes in one call: the limit is ",
              UINT32_MAX - 1, " bytes");
  Scratch& scratch = thread_scratch();
  scratch.reset();
  Bpe::Scratch& model_scratch = model_->thread_scratch();
  const bool track = spans != nullptr || metaspace_first_with_normalizer_;
  thread_local std::vector<AddedTokenMatcher::Found> segments;
  if (original_matcher_.empty()) {
    if (!text.empty()) encode_segment(text, 0, track, scratch, model_scratch, ids, spans);
    return;
  }
  original_matcher_.split(text, added_, segments);
  for (const AddedTokenMatcher::Found& segment : segments) {
    if (segment.token >= 0) {
      ids.push_back(added_[segment.token].id);
      if (spans != nullptr) spans->push_back({segment.begin, segment.end});
    } else {
      encode_segment(text.substr(segment.begin, segment.end - segment.begin), segment.begin, track, scratch,
                     model_scratch, ids, spans);
    }
  }
}

// One stretch of text between added tokens: normalized, searched for normalized added tokens,
// pre-tokenized and run through the model.
void HfTokenizer::encode_segment(std::string_view text, std::uint32_t original_begin, bool track, Scratch& scratch,
                                 Bpe::Scratch& model_scratch, std::vector<std::int32_t>& ids,
                                 std::vector<TokenSpan>* spans) const {
  std::string_view normalized = text;
  const std::uint32_t* origin = nullptr;
  if (normalizer_ != nullptr || track) {
    std::string& buffer = scratch.new_text();
    buffer.assign(text);
    std::vector<std::uint32_t>* origin_buffer = nullptr;
    if (track) {
      origin_buffer = &scratch.new_origin();
      origin_buffer->resize(text.size() + 1);
      for (std::uint32_t i = 0; i <= text.size(); ++i) (*origin_buffer)[i] = original_begin + i;
    }
    if (normalizer_ != nullptr) normalizer_->normalize(buffer, origin_buffer);
    if (buffer.empty()) return;
    normalized = buffer;
    origin = origin_buffer != nullptr ? origin_buffer->data() : nullptr;
  }
  const Piece whole{normalized, origin, origin != nullptr ? origin[0] : original_begin};
  if (normalized_matcher_.empty()) {
    encode_piece(whole, scratch, model_scratch, ids, spans);
    return;
  }
  thread_local std::vector<AddedTokenMatcher::Found> found;
  normalized_matcher_.split(normalized, added_, found);
  for (const AddedTokenMatcher::Found& segment : found) {
    const Piece piece = sub_piece(whole, segment.begin, segment.end);
    if (segment.token >= 0) {
      ids.push_back(added_[segment.token].id);
      if (spans != nullptr) spans->push_back({piece.origin[0], piece.origin[piece.text.size()]});
    } else {
      encode_piece(piece, scratch, model_scratch, ids, spans);
    }
  }
}

void HfTokenizer::encode_piece(const Piece& piece, Scratch& scratch, Bpe::Scratch& model_scratch,
                               std::vector<std::int32_t>& ids, std::vector<TokenSpan>* spans) const {
  std::vector<std::uint32_t>* lengths = spans != nullptr ? &scratch.lengths : nullptr;
  if (pre_tokenizer_ == nullptr) {
    if (lengths != nullptr) lengths->clear();
    const std::size_t first = ids.size();
    model_->tokenize(piece.text, ids, lengths, model_scratch);
    if (spans != nullptr) {
      std::size_t offset = 0;
      for (std::size_t i = first; i < ids.size(); ++i) {
        const std::uint32_t length = (*lengths)[i - first];
        spans->push_back({piece.origin[offset], piece.origin[offset + length]});
        offset += length;
      }
    }
    return;
  }
  std::vector<Piece>& words = scratch.pieces;
  words.assign(1, piece);
  pre_tokenizer_->pre_tokenize(words, scratch);
  for (const Piece& word : words) {
    if (lengths != nullptr) lengths->clear();
    const std::size_t first = ids.size();
    model_->tokenize(word.text, ids, lengths, model_scratch);
    if (spans != nullptr) {
      std::size_t offset = 0;
      for (std::size_t i = first; i < ids.size(); ++i) {
        const std::uint32_t length = (*lengths)[i - first];
        spans->push_back({word.origin[offset], word.origin[offset + length]});
        offset += length;
      }
    }
  }
}

std::vector<std::int64_t> HfTokenizer::encode_with_special_tokens(std::string_view text) const {
  std::vector<std::int32_t> ids;
  encode(text, ids, nullptr);
  std::vector<std::int64_t> framed(frame_.before.begin(), frame_.before.end());
  framed.insert(framed.end(), ids.begin(), ids.end());
  framed.insert(framed.end(), frame_.after.begin(), frame_.after.end());
  return framed;
}

const std::string* HfTokenizer::token_string(std::int64_t id) const {
  if (id < 0 || id >= vocab_size_) return nullptr;
  const std::int32_t added = added_by_id_[id];
  if (added >= 0) return &added_[added].pattern;
  return model_->id_to_token(static_cast<std::int32_t>(id));
}

std::string HfTokenizer::decode(const std::vector<std::int64_t>& ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (std::int64_t id : ids) {
    // As the reference: an id without a token (past the vocabulary of a model whose embedding is
    // padded, say) decodes to nothing.
    const std::string* token = token_string(id);
    if (token == nullptr) continue;
    if (skip_special_tokens && special_contents_.count(*token) != 0) continue;
    tokens.push_back(*token);
  }
  if (decoder_ == nullptr) {
    std::string joined;
    for (std::size_t i = 0; i < tokens.size(); ++i) joined += (i == 0 ? "" : " ") + tokens[i];
    return joined;
  }
  decoder_->decode_chain(tokens);
  std::string joined;
  for (const std::string& token : tokens) joined += token;
  return joined;
}

std::optional<std::int64_t> HfTokenizer::token_to_id(std::string_view token) const {
  for (const AddedToken& added : added_) {
    if (added.content == token) return added.id;
  }
  const std::int32_t id = model_->token_to_id(token);
  if (id >= 0) return id;
  return std::nullopt;
}

std::string HfTokenizer::id_to_token(std::int64_t id) const {
  FERRY_CHECK(id >= 0 && id < vocab_size_, "token id ", id, " is outside ", path_, "'s vocabulary: valid are 0 to ",
              vocab_size_ - 1);
  const std::int32_t added = added_by_id_[id];
  if (added >= 0) return added_[added].content;
  const std::string* token = model_->id_to_token(static_cast<std::int32_t>(id));
  return token != nullptr ? *token : std::string();
}

}  // namespace

std::unique_ptr<Tokenizer> read_tokenizer_json(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  FERRY_CHECK(file.is_open(), "cannot open ", path);
  std::stringstream text;
  text << file.rdbuf();
  Json root = Json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  FERRY_CHECK(!root.is_discarded() && root.is_object(), path, " is not a JSON object (a Hugging Face tokenizer.json)");
  return std::make_unique<HfTokenizer>(root, path);
}

}  // namespace ferry::tokenizer
