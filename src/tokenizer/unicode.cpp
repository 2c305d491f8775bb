#include "tokenizer/unicode.h"

#include <cstdlib>
#include <memory>

#include <utf8proc.h>

#include "ferry/check.h"

namespace ferry::tokenizer {
namespace {

bool in(unsigned char byte, unsigned char low, unsigned char high) { return byte >= low && byte <= high; }

// The length of the well-formed UTF-8 sequence at text[at], or 0 when there is none; `valid`
// then says how many of its leading bytes could still begin one (the "maximal subpart" that
// Unicode, and Rust's lossy decoding, replace by one U+FFFD).
std::size_t well_formed_length(std::string_view text, std::size_t at, std::size_t* valid) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char lead = byte(at);
  *valid = 1;
  if (lead < 0x80) return 1;
  unsigned char second_low = 0x80, second_high = 0xBF;
  std::size_t length = 0;
  if (in(lead, 0xC2, 0xDF)) {
    length = 2;
  } else if (lead == 0xE0) {
    length = 3, second_low = 0xA0;
  } else if (in(lead, 0xE1, 0xEC) || in(lead, 0xEE, 0xEF)) {
    length = 3;
  } else if (lead == 0xED) {
    length = 3, second_high = 0x9F;
  } else if (lead == 0xF0) {
    length = 4, second_low = 0x90;
  } else if (in(lead, 0xF1, 0xF3)) {
    length = 4;
  } else if (lead == 0xF4) {
    length = 4, second_high = 0x8F;
  } else {
    return 0;
  }
  for (std::size_t i = 1; i < length; ++i) {
    if (at + i >= text.size()) return 0;
    const bool ok = i == 1 ? in(byte(at + i), second_low, second_high) : in(byte(at + i), 0x80, 0xBF);
    if (!ok) return 0;
    *valid = i + 1;
  }
  return length;
}

struct FreeDeleter {
  void operator()(utf8proc_uint8_t* pointer) const { std::free(pointer); }
};

int form_options(NormalForm form) {
  switch (form) {
    case NormalForm::kNfc: return UTF8PROC_STABLE | UTF8PROC_COMPOSE;
    case NormalForm::kNfd: return UTF8PROC_STABLE | UTF8PROC_DECOMPOSE;
    case NormalForm::kNfkc: return UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
    case NormalForm::kNfkd: return UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
  }
  FERRY_ASSERT(false, "unknown normal form");
  return 0;
}

// Below U+0300 every character is a starter that NFC leaves alone (the first characters NFC
// changes or composes with are the combining marks from U+0300, lead byte 0xCC); the other forms
// change Latin-1 letters too, so only ASCII is known to pass through them.
unsigned char first_byte_that_may_change(NormalForm form) { return form == NormalForm::kNfc ? 0xCC : 0x80; }

}  // namespace

DecodedChar decode_utf8(std::string_view text, std::size_t at) {
  const auto byte = [&](std::size_t i) { return static_cast<char32_t>(static_cast<unsigned char>(text[at + i])); };
  const unsigned char lead = static_cast<unsigned char>(text[at]);
  if (lead < 0x80) return {lead, 1};
  if (lead < 0xE0) return {(byte(0) & 0x1F) << 6 | (byte(1) & 0x3F), 2};
  if (lead < 0xF0) return {(byte(0) & 0x0F) << 12 | (byte(1) & 0x3F) << 6 | (byte(2) & 0x3F), 3};
  return {(byte(0) & 0x07) << 18 | (byte(1) & 0x3F) << 12 | (byte(2) & 0x3F) << 6 | (byte(3) & 0x3F), 4};
}

void append_utf8(char32_t c, std::string& out) {
  if (c < 0x80) {
    out.push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (c >> 6)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (c >> 12)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (c >> 18)));
    out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

std::size_t first_invalid_utf8(std::string_view text) {
  std::size_t at = 0;
  while (at < text.size()) {
    if (static_cast<unsigned char>(text[at]) < 0x80) {
      ++at;
      continue;
    }
    std::size_t valid = 0;
    const std::size_t length = well_formed_length(text, at, &valid);
    if (length == 0) return at;
    at += length;
  }
  return text.size();
}

std::string from_utf8_lossy(std::string_view bytes) {
  std::string text;
  text.reserve(bytes.size());
  std::size_t at = 0;
  while (at < bytes.size()) {
    std::size_t valid = 0;
    const std::size_t length = well_formed_length(bytes, at, &valid);
    if (length > 0) {
      text.append(bytes.data() + at, length);
      at += length;
    } else {
      text += "\xEF\xBF\xBD";
      at += valid;
    }
  }
  return text;
}

bool is_whitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

bool is_word_character(char32_t c) {
  if (c < 0x80) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  }
  if (c == 0x200C || c == 0x200D) return true;
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT: case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_MC: case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_PC:
      return true;
    default:
      return false;
  }
}

bool is_numeric(char32_t c) {
  if (c < 0x80) return c >= '0' && c <= '9';
  const utf8proc_category_t category = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return category == UTF8PROC_CATEGORY_ND || category == UTF8PROC_CATEGORY_NL || category == UTF8PROC_CATEGORY_NO;
}

bool is_nonspacing_mark(char32_t c) {
  return c >= 0x300 && utf8proc_category(static_cast<utf8proc_int32_t>(c)) == UTF8PROC_CATEGORY_MN;
}

void normalize(NormalForm form, std::string& text, std::vector<std::uint32_t>* origin) {
  const unsigned char threshold = first_byte_that_may_change(form);
  bool may_change = false;
  for (char c : text) {
    if (static_cast<unsigned char>(c) >= threshold) {
      may_change = true;
      break;
    }
  }
  if (!may_change) return;
  const std::size_t size = text.size();
  const auto is_ascii = [&](std::size_t i) { return static_cast<unsigned char>(text[i]) < 0x80; };
  std::string out;
  out.reserve(size + size / 4);
  std::vector<std::uint32_t> out_origin;
  if (origin != nullptr) out_origin.reserve(out.capacity() + 1);
  std::size_t at = 0;
  while (at < size) {
    const std::size_t start = at;
    if (is_ascii(at)) {
      ++at;
      if (at == size || is_ascii(at)) {
        out.push_back(text[start]);
        if (origin != nullptr) out_origin.push_back((*origin)[start]);
        continue;
      }
    }
    while (at < size && !is_ascii(at)) ++at;
    utf8proc_uint8_t* mapped = nullptr;
    const utf8proc_ssize_t length =
        utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data() + start),
                     static_cast<utf8proc_ssize_t>(at - start), &mapped, static_cast<utf8proc_option_t>(form_options(form)));
    std::unique_ptr<utf8proc_uint8_t, FreeDeleter> owner(mapped);
    FERRY_ASSERT(length >= 0, "utf8proc_map failed on validated UTF-8: ", utf8proc_errmsg(length));
    const std::string_view chunk(text.data() + start, at - start);
    const std::string_view result(reinterpret_cast<const char*>(mapped), static_cast<std::size_t>(length));
    out.append(result);
    if (origin != nullptr) {
      if (result == chunk) {
        out_origin.insert(out_origin.end(), origin->begin() + start, origin->begin() + at);
      } else {
        out_origin.insert(out_origin.end(), result.size(), (*origin)[start]);
      }
    }
  }
  if (origin != nullptr) {
    out_origin.push_back(origin->back());
    *origin = std::move(out_origin);
  }
  text = std::move(out);
}

void lowercase(std::string& text, std::vector<std::uint32_t>* origin) {
  std::string out;
  out.reserve(text.size());
  std::vector<std::uint32_t> out_origin;
  if (origin != nullptr) out_origin.reserve(text.size() + 1);
  for (std::size_t at = 0; at < text.size();) {
    const DecodedChar decoded = decode_utf8(text, at);
    const std::size_t before = out.size();
    if (decoded.code_point == 0x130) {
      out += "i\xCC\x87";
    } else if (decoded.code_point < 0x80) {
      const char c = text[at];
      out.push_back(c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c);
    } else {
      append_utf8(static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(decoded.code_point))), out);
    }
    if (origin != nullptr) out_origin.insert(out_origin.end(), out.size() - before, (*origin)[at]);
    at += decoded.bytes;
  }
  if (origin != nullptr) {
    out_origin.push_back(origin->back());
    *origin = std::move(out_origin);
  }
  text = std::move(out);
}

}  // namespace ferry::tokenizer
