#include "tokenizer/bpe.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <memory>

#include "ferry/check.h"
#include "tokenizer/unicode.h"

namespace ferry::tokenizer {
namespace {

std::size_t power_of_two_at_least(std::size_t value) {
  std::size_t size = 16;
  while (size < value) size *= 2;
  return size;
}

std::uint64_t next_scratch_owner() {
  static std::atomic<std::uint64_t> counter{0};
  return ++counter;
}

// The heap's order: lowest rank first, then the leftmost position (std::*_heap keep the
// greatest on top, so "greater" here means "merged later").
bool merged_later(const Bpe::Candidate& a, const Bpe::Candidate& b) {
  return a.rank != b.rank ? a.rank > b.rank : a.position > b.position;
}

constexpr std::int32_t kRemoved = -2;

std::string byte_fallback_token(unsigned char byte) {
  char text[8];
  std::snprintf(text, sizeof text, "<0x%02X>", byte);
  return text;
}

}  // namespace

// --- tables -----------------------------------------------------------------------------------

void StringTable::reserve(std::size_t entries) {
  if (slots_.size() < entries * 2) {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(power_of_two_at_least(entries * 2), Slot{});
    size_ = 0;
    for (const Slot& slot : old) {
      if (slot.length == UINT32_MAX) continue;
      const std::size_t mask = slots_.size() - 1;
      std::size_t i = slot.hash & mask;
      while (slots_[i].length != UINT32_MAX) i = (i + 1) & mask;
      slots_[i] = slot;
      ++size_;
    }
  }
}

void StringTable::grow() { reserve(std::max<std::size_t>(16, slots_.size())); }

void StringTable::insert(std::string_view key, std::int32_t value) {
  if ((size_ + 1) * 2 > slots_.size()) grow();
  const std::uint64_t hash = hash_bytes(key);
  const std::size_t mask = slots_.size() - 1;
  for (std::size_t i = hash & mask;; i = (i + 1) & mask) {
    Slot& slot = slots_[i];
    if (slot.length == UINT32_MAX) {
      slot.hash = hash;
      slot.offset = static_cast<std::uint32_t>(keys_.size());
      slot.length = static_cast<std::uint32_t>(key.size());
      slot.value = value;
      keys_.append(key);
      ++size_;
      return;
    }
    if (slot.hash == hash && std::string_view(keys_.data() + slot.offset, slot.length) == key) return;
  }
}

std::int32_t StringTable::find(std::string_view key, std::uint64_t hash) const {
  if (slots_.empty()) return -1;
  const std::size_t mask = slots_.size() - 1;
  for (std::size_t i = hash & mask;; i = (i + 1) & mask) {
    const Slot& slot = slots_[i];
    if (slot.length == UINT32_MAX) return -1;
    if (slot.hash == hash && slot.length == key.size() &&
        std::memcmp(keys_.data() + slot.offset, key.data(), key.size()) == 0) {
      return slot.value;
    }
  }
}

void MergeTable::reserve(std::size_t entries) {
  if (slots_.size() >= entries * 2) return;
  std::vector<Slot> old = std::move(slots_);
  slots_.assign(power_of_two_at_least(entries * 2), Slot{});
  const std::size_t mask = slots_.size() - 1;
  for (const Slot& slot : old) {
    if (slot.key == kEmpty) continue;
    std::size_t i = mix64(slot.key) & mask;
    while (slots_[i].key != kEmpty) i = (i + 1) & mask;
    slots_[i] = slot;
  }
}

void MergeTable::grow() { reserve(slots_.size()); }

void MergeTable::insert(std::int32_t left, std::int32_t right, Merge merge) {
  if ((size_ + 1) * 2 > slots_.size()) grow();
  const std::uint64_t key = pair_key(left, right);
  const std::size_t mask = slots_.size() - 1;
  for (std::size_t i = mix64(key) & mask;; i = (i + 1) & mask) {
    Slot& slot = slots_[i];
    if (slot.key == key) {
      slot.merge = merge;
      return;
    }
    if (slot.key == kEmpty) {
      slot = {key, merge};
      ++size_;
      return;
    }
  }
}

WordCache::WordCache() : slots_(kMaxWords * 2) {}

void WordCache::clear() {
  std::fill(slots_.begin(), slots_.end(), Slot{});
  keys_.clear();
  ids_.clear();
  lengths_.clear();
  size_ = 0;
}

bool WordCache::find(std::string_view word, std::uint64_t hash, std::vector<std::int32_t>& ids,
                     std::vector<std::uint32_t>* lengths) const {
  const std::size_t mask = slots_.size() - 1;
  for (std::size_t i = hash & mask;; i = (i + 1) & mask) {
    const Slot& slot = slots_[i];
    if (slot.key_length == UINT32_MAX) return false;
    if (slot.hash == hash && slot.key_length == word.size() &&
        std::memcmp(keys_.data() + slot.key_offset, word.data(), word.size()) == 0) {
      ids.insert(ids.end(), ids_.begin() + slot.value_offset, ids_.begin() + slot.value_offset + slot.value_count);
      if (lengths != nullptr) {
        lengths->insert(lengths->end(), lengths_.begin() + slot.value_offset,
                        lengths_.begin() + slot.value_offset + slot.value_count);
      }
      return true;
    }
  }
}

void WordCache::insert(std::string_view word, std::uint64_t hash, const std::int32_t* ids,
                       const std::uint32_t* lengths, std::size_t count) {
  if (size_ == kMaxWords) clear();
  const std::size_t mask = slots_.size() - 1;
  std::size_t i = hash & mask;
  while (slots_[i].key_length != UINT32_MAX) {
    if (slots_[i].hash == hash && slots_[i].key_length == word.size() &&
        std::memcmp(keys_.data() + slots_[i].key_offset, word.data(), word.size()) == 0) {
      return;
    }
    i = (i + 1) & mask;
  }
  Slot& slot = slots_[i];
  slot.hash = hash;
  slot.key_offset = static_cast<std::uint32_t>(keys_.size());
  slot.key_length = static_cast<std::uint32_t>(word.size());
  slot.value_offset = static_cast<std::uint32_t>(ids_.size());
  slot.value_count = static_cast<std::uint32_t>(count);
  keys_.append(word);
  ids_.insert(ids_.end(), ids, ids + count);
  lengths_.insert(lengths_.end(), lengths, lengths + count);
  ++size_;
}

// --- the byte-level table ------------------------------------------------------------------------

char32_t byte_level_char(unsigned char byte) {
  static const std::array<char32_t, 256> table = [] {
    std::array<char32_t, 256> chars{};
    std::array<bool, 256> printable{};
    for (int b = '!'; b <= '~'; ++b) printable[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) printable[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) printable[b] = true;
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) chars[b] = printable[b] ? static_cast<char32_t>(b) : next++;
    return chars;
  }();
  return table[byte];
}

int byte_level_byte(char32_t code_point) {
  if (code_point < 256) {
    return byte_level_char(static_cast<unsigned char>(code_point)) == code_point ? static_cast<int>(code_point) : -1;
  }
  for (int b = 0; b < 256; ++b) {
    if (byte_level_char(static_cast<unsigned char>(b)) == code_point) return b;
  }
  return -1;
}

// --- the model ----------------------------------------------------------------------------------

Bpe::Bpe(std::vector<std::string> tokens, const std::vector<std::pair<std::string, std::string>>& merges,
         BpeOptions options, const std::string& where)
    : tokens_(std::move(tokens)), options_(std::move(options)), where_(where), scratch_owner_(next_scratch_owner()) {
  FERRY_CHECK(!options_.byte_level || (options_.continuing_subword_prefix.empty() && options_.end_of_word_suffix.empty()),
              where_, ": a byte-level BPE with continuing_subword_prefix or end_of_word_suffix is not supported ",
              "(valid: neither, as GPT-2, Llama-3 and Qwen2 have it)");
  vocabulary_.reserve(tokens_.size());
  for (std::size_t id = 0; id < tokens_.size(); ++id) {
    if (!tokens_[id].empty()) vocabulary_.insert(tokens_[id], static_cast<std::int32_t>(id));
  }
  if (options_.byte_level) {
    word_tokens_.reserve(tokens_.size());
    for (std::size_t id = 0; id < tokens_.size(); ++id) {
      const std::string& token = tokens_[id];
      std::string bytes;
      bool maps = !token.empty();
      for (std::size_t at = 0; at < token.size() && maps;) {
        const DecodedChar decoded = decode_utf8(token, at);
        const int byte = byte_level_byte(decoded.code_point);
        maps = byte >= 0;
        bytes.push_back(static_cast<char>(byte));
        at += decoded.bytes;
      }
      if (maps) word_tokens_.insert(bytes, static_cast<std::int32_t>(id));
    }
    for (int b = 0; b < 256; ++b) {
      byte_chars_[b].clear();
      append_utf8(byte_level_char(static_cast<unsigned char>(b)), byte_chars_[b]);
      byte_ids_[b] = vocabulary_.find(byte_chars_[b]);
    }
  }
  for (int c = 0; c < 128; ++c) ascii_ids_[c] = vocabulary_.find(std::string(1, static_cast<char>(c)));
  for (int b = 0; b < 256; ++b) fallback_ids_[b] = vocabulary_.find(byte_fallback_token(static_cast<unsigned char>(b)));
  if (options_.unk_token) unk_id_ = vocabulary_.find(*options_.unk_token);

  merges_.reserve(merges.size());
  const std::size_t prefix_length = options_.continuing_subword_prefix.size();
  std::string merged;
  for (std::size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [left, right] = merges[rank];
    const std::int32_t left_id = vocabulary_.find(left);
    const std::int32_t right_id = vocabulary_.find(right);
    FERRY_CHECK(left_id >= 0 && right_id >= 0, where_, ": merge ", rank, " ('", left, "', '", right,
                "') names a token that is not in the vocabulary: '", left_id < 0 ? left : right, "'");
    merged.assign(left);
    merged.append(right, std::min(prefix_length, right.size()), std::string::npos);
    const std::int32_t merged_id = vocabulary_.find(merged);
    FERRY_CHECK(merged_id >= 0, where_, ": merge ", rank, " ('", left, "', '", right, "') makes '", merged,
                "', which is not in the vocabulary");
    merges_.insert(left_id, right_id, {static_cast<std::uint32_t>(rank), merged_id});
  }
}

// Note: each thread keeps its own scratch (and word cache), one per model it has used lately, so
// the hot loop takes no lock. A model is known by a number drawn once, never by its address, which
// a later model could reuse.
Bpe::Scratch& Bpe::thread_scratch() const {
  struct Entry {
    std::uint64_t owner;
    std::unique_ptr<Scratch> scratch;
  };
  constexpr std::size_t kModelsPerThread = 4;
  thread_local std::vector<Entry> entries;
  for (Entry& entry : entries) {
    if (entry.owner == scratch_owner_) return *entry.scratch;
  }
  if (entries.size() == kModelsPerThread) entries.erase(entries.begin());
  entries.push_back({scratch_owner_, std::make_unique<Scratch>()});
  return *entries.back().scratch;
}

const std::string* Bpe::id_to_token(std::int32_t id) const {
  if (id < 0 || id >= size() || tokens_[id].empty()) return nullptr;
  return &tokens_[id];
}

// As the reference's merge_word: a character outside the vocabulary becomes its bytes' "<0xAB>"
// tokens when byte fallback has them all, else the unknown token (consecutive ones fused into one
// with fuse_unk), else nothing.
//
// Note: the reference adds a pending unknown token only when the next known character comes (or
// the word ends), not before byte-fallback tokens; so an unknown character followed by one that
// falls back to bytes comes out after those bytes. That order is kept.
void Bpe::initial_symbols(std::string_view word, Scratch& scratch) const {
  std::vector<Symbol>& symbols = scratch.symbols;
  bool unk_pending = false;
  std::uint32_t unk_length = 0;
  const auto add = [&](std::int32_t id, std::uint32_t length) {
    symbols.push_back({id, length, static_cast<std::int32_t>(symbols.size()) - 1, static_cast<std::int32_t>(symbols.size()) + 1});
  };
  const auto flush_unk = [&] {
    if (unk_pending) add(unk_id_, unk_length);
    unk_pending = false;
  };
  const auto missing = [&](std::string_view character, std::uint32_t length) {
    if (options_.byte_fallback) {
      bool all = true;
      for (char byte : character) all = all && fallback_ids_[static_cast<unsigned char>(byte)] >= 0;
      if (all) {
        for (std::size_t i = 0; i < character.size(); ++i) {
          add(fallback_ids_[static_cast<unsigned char>(character[i])], i == 0 ? length : 0);
        }
        return;
      }
    }
    if (!options_.unk_token) return;
    FERRY_CHECK(unk_id_ >= 0, where_, ": the unknown token '", *options_.unk_token, "' is not in the vocabulary");
    if (unk_pending && options_.fuse_unk) {
      unk_length += length;
      return;
    }
    flush_unk();
    unk_pending = true;
    unk_length = length;
  };

  if (options_.byte_level) {
    for (char c : word) {
      const auto byte = static_cast<unsigned char>(c);
      if (byte_ids_[byte] >= 0) {
        flush_unk();
        add(byte_ids_[byte], 1);
      } else {
        missing(byte_chars_[byte], 1);
      }
    }
  } else {
    const bool affixes = !options_.continuing_subword_prefix.empty() || !options_.end_of_word_suffix.empty();
    std::string& key = scratch.key;
    for (std::size_t at = 0; at < word.size();) {
      const std::uint32_t length = std::min<std::uint32_t>(utf8_length(static_cast<unsigned char>(word[at])),
                                                           static_cast<std::uint32_t>(word.size() - at));
      const std::string_view character = word.substr(at, length);
      std::int32_t id;
      if (affixes) {
        key.clear();
        if (at > 0) key += options_.continuing_subword_prefix;
        key.append(character);
        if (at + length == word.size()) key += options_.end_of_word_suffix;
        id = vocabulary_.find(key);
      } else {
        id = length == 1 ? ascii_ids_[static_cast<unsigned char>(character[0]) & 0x7F] : vocabulary_.find(character);
      }
      if (id >= 0) {
        flush_unk();
        add(id, length);
      } else {
        missing(affixes ? std::string_view(key) : character, length);
      }
      at += length;
    }
  }
  flush_unk();
  if (!symbols.empty()) symbols.back().next = -1;
}

void Bpe::merge(Scratch& scratch) const {
  std::vector<Symbol>& symbols = scratch.symbols;
  if (symbols.size() < 2) return;
  std::vector<Candidate>& heap = scratch.heap;
  heap.clear();
  for (std::size_t i = 0; i + 1 < symbols.size(); ++i) {
    const Merge found = merges_.find(symbols[i].id, symbols[i + 1].id);
    if (found.rank != UINT32_MAX) heap.push_back({found.rank, static_cast<std::uint32_t>(i), found.merged});
  }
  std::make_heap(heap.begin(), heap.end(), merged_later);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), merged_later);
    const Candidate top = heap.back();
    heap.pop_back();
    Symbol& current = symbols[top.position];
    if (current.id == kRemoved || current.next < 0) continue;
    Symbol right = symbols[current.next];
    // A stale entry: one of the pair merged with something else since it was queued.
    const Merge still = merges_.find(current.id, right.id);
    if (still.rank == UINT32_MAX || still.merged != top.merged) continue;
    symbols[current.next].id = kRemoved;
    current.id = top.merged;
    current.length += right.length;
    current.next = right.next;
    if (right.next >= 0) symbols[right.next].previous = static_cast<std::int32_t>(top.position);
    if (current.previous >= 0) {
      const Merge with_previous = merges_.find(symbols[current.previous].id, current.id);
      if (with_previous.rank != UINT32_MAX) {
        heap.push_back({with_previous.rank, static_cast<std::uint32_t>(current.previous), with_previous.merged});
        std::push_heap(heap.begin(), heap.end(), merged_later);
      }
    }
    if (current.next >= 0) {
      const Merge with_next = merges_.find(current.id, symbols[current.next].id);
      if (with_next.rank != UINT32_MAX) {
        heap.push_back({with_next.rank, top.position, with_next.merged});
        std::push_heap(heap.begin(), heap.end(), merged_later);
      }
    }
  }
}

void Bpe::tokenize(std::string_view word, std::vector<std::int32_t>& ids, std::vector<std::uint32_t>* lengths,
                   Scratch& scratch) const {
  if (word.empty()) return;
  const bool cached = word.size() < WordCache::kMaxWordBytes;
  const std::uint64_t hash = hash_bytes(word);
  if (cached && scratch.cache.find(word, hash, ids, lengths)) return;
  std::vector<std::int32_t>& word_ids = scratch.ids;
  std::vector<std::uint32_t>& word_lengths = scratch.lengths;
  word_ids.clear();
  word_lengths.clear();
  const std::int32_t whole =
      options_.ignore_merges ? (options_.byte_level ? word_tokens_ : vocabulary_).find(word, hash) : -1;
  if (whole >= 0) {
    word_ids.push_back(whole);
    word_lengths.push_back(static_cast<std::uint32_t>(word.size()));
  } else {
    scratch.symbols.clear();
    initial_symbols(word, scratch);
    merge(scratch);
    for (const Symbol& symbol : scratch.symbols) {
      if (symbol.id == kRemoved) continue;
      word_ids.push_back(symbol.id);
      word_lengths.push_back(symbol.length);
    }
  }
  ids.insert(ids.end(), word_ids.begin(), word_ids.end());
  if (lengths != nullptr) lengths->insert(lengths->end(), word_lengths.begin(), word_lengths.end());
  if (cached) scratch.cache.insert(word, hash, word_ids.data(), word_lengths.data(), word_ids.size());
}

}  // namespace ferry::tokenizer
