#pragma once

// What Hugging Face's Split pre-tokenizer and Replace normalizer/decoder match: a literal string
// or an Oniguruma regex (as tokenizer.json writes them), run here by PCRE2 with UTF and Unicode
// properties, JIT-compiled where the platform has a JIT.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ferry::tokenizer {

using Match = std::pair<std::uint32_t, std::uint32_t>;  // byte offsets [begin, end)

class Pattern {
 public:
  static Pattern literal(std::string text);
  // Throws ferry::Error naming the pattern, PCRE2's message and the offset it points at.
  static Pattern regex(const std::string& oniguruma_pattern);

  Pattern(Pattern&&) noexcept;
  Pattern& operator=(Pattern&&) noexcept;
  ~Pattern();

  // Appends the matches in text, left to right and non-overlapping, as Oniguruma's find_iter
  // gives them: an empty match right where the previous match ended is skipped. text must be
  // valid UTF-8. Thread-safe.
  void find_all(std::string_view text, std::vector<Match>& matches) const;

  const std::string& source() const { return source_; }

 private:
  struct Compiled;
  Pattern() = default;

  std::string source_;
  std::string literal_;
  std::unique_ptr<Compiled> compiled_;  // null for a literal
};

// The pattern with Oniguruma's \s and \S (the White_Space property, U+0085 and U+00A0 included)
// spelled out as classes, so that PCRE2, whose \s differs, matches the same characters.
std::string translate_oniguruma(const std::string& pattern);

}  // namespace ferry::tokenizer
