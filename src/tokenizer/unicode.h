#pragma once

// UTF-8 and Unicode character classes as Hugging Face tokenizers (Rust) sees them, on top of
// utf8proc. Free of torch.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ferry::tokenizer {

// The code point at text[at] and its length in bytes. text must be valid UTF-8 there.
struct DecodedChar {
  char32_t code_point;
  std::uint32_t bytes;
};
DecodedChar decode_utf8(std::string_view text, std::size_t at);
inline std::uint32_t utf8_length(unsigned char lead) {
  return lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
}
void append_utf8(char32_t code_point, std::string& out);

// The offset of the first byte that is not well-formed UTF-8, or text.size() when it all is.
std::size_t first_invalid_utf8(std::string_view text);

// Rust's String::from_utf8_lossy: every maximal ill-formed subsequence becomes U+FFFD.
std::string from_utf8_lossy(std::string_view bytes);

// Rust's char::is_whitespace (the White_Space property), which Oniguruma's \s also matches.
bool is_whitespace(char32_t c);
// Rust regex's \w: alphabetic, marks, decimal digits, connector punctuation, join controls.
bool is_word_character(char32_t c);
// Rust's char::is_numeric: categories Nd, Nl and No.
bool is_numeric(char32_t c);
bool is_nonspacing_mark(char32_t c);

enum class NormalForm { kNfc, kNfd, kNfkc, kNfkd };

// Normalizes text in place. When origin is given it holds, for each byte of text and one past
// its end, the original offset the byte came from, and is kept parallel to the result.
//
// Note: normalization runs separately on each chunk that starts at an ASCII character (or the
// text's start) and holds the non-ASCII characters after it. A boundary before an ASCII
// character is stable in every normal form (ASCII characters are starters that never compose
// with what precedes them), so the concatenation equals the normal form of the whole text, and a
// chunk the form leaves alone keeps exact offsets.
void normalize(NormalForm form, std::string& text, std::vector<std::uint32_t>* origin);

// Rust's char::to_lowercase, character by character (U+0130 becomes "i" + U+0307).
void lowercase(std::string& text, std::vector<std::uint32_t>* origin);

}  // namespace ferry::tokenizer
