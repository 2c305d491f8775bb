#pragma once

// Flat open-addressing hash tables for the tokenizer's hot loop: byte strings to ids (keys held in
// one arena, looked up by string_view, so no lookup allocates) and id pairs to merges.

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace ferry::tokenizer {

inline std::uint64_t mix64(std::uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

inline std::uint64_t hash_bytes(std::string_view bytes) {
  std::uint64_t hash = 0x9e3779b97f4a7c15ULL ^ bytes.size();
  const char* p = bytes.data();
  std::size_t left = bytes.size();
  while (left >= 8) {
    std::uint64_t word;
    std::memcpy(&word, p, 8);
    hash = mix64(hash ^ word);
    p += 8;
    left -= 8;
  }
  std::uint64_t tail = 0;
  std::memcpy(&tail, p, left);
  return mix64(hash ^ tail ^ (std::uint64_t{left} << 59));
}

// Byte strings to int32 values; insert keeps the first value of a key.
class StringTable {
 public:
  void reserve(std::size_t entries);
  void insert(std::string_view key, std::int32_t value);
  // -1 when absent.
  std::int32_t find(std::string_view key) const { return find(key, hash_bytes(key)); }
  std::int32_t find(std::string_view key, std::uint64_t hash) const;
  std::size_t size() const { return size_; }

 private:
  struct Slot {
    std::uint64_t hash = 0;
    std::uint32_t offset = 0;
    std::uint32_t length = UINT32_MAX;  // UINT32_MAX: empty
    std::int32_t value = -1;
  };
  void grow();

  std::vector<Slot> slots_;
  std::string keys_;
  std::size_t size_ = 0;
};

struct Merge {
  std::uint32_t rank = UINT32_MAX;  // UINT32_MAX: no merge
  std::int32_t merged = -1;
};

// Pairs of ids to the merge that joins them; insert overwrites, as the reference's map does.
class MergeTable {
 public:
  void reserve(std::size_t entries);
  void insert(std::int32_t left, std::int32_t right, Merge merge);
  Merge find(std::int32_t left, std::int32_t right) const {
    const std::uint64_t key = pair_key(left, right);
    const std::size_t mask = slots_.size() - 1;
    for (std::size_t i = mix64(key) & mask;; i = (i + 1) & mask) {
      const Slot& slot = slots_[i];
      if (slot.key == key) return slot.merge;
      if (slot.key == kEmpty) return {};
    }
  }
  std::size_t size() const { return size_; }

 private:
  static constexpr std::uint64_t kEmpty = UINT64_MAX;
  static std::uint64_t pair_key(std::int32_t left, std::int32_t right) {
    return std::uint64_t{static_cast<std::uint32_t>(left)} << 32 | static_cast<std::uint32_t>(right);
  }
  struct Slot {
    std::uint64_t key = kEmpty;
    Merge merge;
  };
  void grow();

  std::vector<Slot> slots_ = std::vector<Slot>(16);
  std::size_t size_ = 0;
};

// The BPE result of recent words: word bytes to their tokens and the bytes each covers. When full
// it starts over, so a long run over a shifting vocabulary of words keeps the words that recur.
class WordCache {
 public:
  static constexpr std::size_t kMaxWordBytes = 256;  // longer words are not cached (as the reference)
  static constexpr std::size_t kMaxWords = 1 << 14;

  WordCache();
  // True, with the tokens appended, on a hit.
  bool find(std::string_view word, std::uint64_t hash, std::vector<std::int32_t>& ids,
            std::vector<std::uint32_t>* lengths) const;
  void insert(std::string_view word, std::uint64_t hash, const std::int32_t* ids, const std::uint32_t* lengths,
              std::size_t count);

 private:
  struct Slot {
    std::uint64_t hash = 0;
    std::uint32_t key_offset = 0;
    std::uint32_t key_length = UINT32_MAX;  // UINT32_MAX: empty
    std::uint32_t value_offset = 0;
    std::uint32_t value_count = 0;
  };
  void clear();

  std::vector<Slot> slots_;
  std::string keys_;
  std::vector<std::int32_t> ids_;
  std::vector<std::uint32_t> lengths_;
  std::size_t size_ = 0;
};

}  // namespace ferry::tokenizer
