#include "tokenizer/pattern.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "ferry/check.h"
#include "tokenizer/unicode.h"

namespace ferry::tokenizer {
namespace {

constexpr const char* kWhiteSpaceItems =
    "\\t-\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}";

std::string pcre2_message(int code) {
  PCRE2_UCHAR buffer[256];
  pcre2_get_error_message(code, buffer, sizeof buffer);
  return reinterpret_cast<const char*>(buffer);
}

struct MatchDataDeleter {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};

// One match block per thread: it only ever holds the whole match's offsets.
pcre2_match_data* thread_match_data() {
  thread_local std::unique_ptr<pcre2_match_data, MatchDataDeleter> data(pcre2_match_data_create(1, nullptr));
  return data.get();
}

}  // namespace

struct Pattern::Compiled {
  pcre2_code* code = nullptr;
  bool jit = false;
  ~Compiled() { pcre2_code_free(code); }
};

std::string translate_oniguruma(const std::string& pattern) {
  std::string out;
  out.reserve(pattern.size() + 64);
  bool in_class = false;
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char next = pattern[i + 1];
      if (next == 's') {
        out += in_class ? kWhiteSpaceItems : std::string("[") + kWhiteSpaceItems + "]";
      } else if (next == 'S' && !in_class) {
        out += std::string("[^") + kWhiteSpaceItems + "]";
      } else {
        out += c;
        out += next;
      }
      ++i;
      continue;
    }
    if (c == '[' && !in_class) {
      in_class = true;
      out += c;
      // A ']' right after '[' or '[^' is a member, not the end of the class.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];
      continue;
    }
    if (c == ']' && in_class) in_class = false;
    out += c;
  }
  return out;
}

Pattern Pattern::literal(std::string text) {
  Pattern pattern;
  pattern.source_ = text;
  pattern.literal_ = std::move(text);
  return pattern;
}

Pattern Pattern::regex(const std::string& oniguruma_pattern) {
  Pattern pattern;
  pattern.source_ = oniguruma_pattern;
  const std::string translated = translate_oniguruma(oniguruma_pattern);
  int error = 0;
  PCRE2_SIZE error_offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()), translated.size(),
                                   PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &error, &error_offset, nullptr);
  FERRY_CHECK(code != nullptr, "cannot compile the regex '", oniguruma_pattern, "' (as PCRE2: '", translated,
              "'): ", pcre2_message(error), " at offset ", error_offset);
  pattern.compiled_ = std::make_unique<Compiled>();
  pattern.compiled_->code = code;
  pattern.compiled_->jit = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
  return pattern;
}

Pattern::Pattern(Pattern&&) noexcept = default;
Pattern& Pattern::operator=(Pattern&&) noexcept = default;
Pattern::~Pattern() = default;

void Pattern::find_all(std::string_view text, std::vector<Match>& matches) const {
  if (compiled_ == nullptr) {
    if (literal_.empty()) return;
    for (std::size_t at = text.find(literal_); at != std::string_view::npos; at = text.find(literal_, at + literal_.size())) {
      matches.emplace_back(static_cast<std::uint32_t>(at), static_cast<std::uint32_t>(at + literal_.size()));
    }
    return;
  }
  pcre2_match_data* data = thread_match_data();
  const auto subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  std::size_t search_from = 0;
  std::size_t last_match_end = SIZE_MAX;
  while (search_from <= text.size()) {
    int rc = compiled_->jit ? pcre2_jit_match(compiled_->code, subject, text.size(), search_from, 0, data, nullptr)
                            : PCRE2_ERROR_JIT_BADOPTION;
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT || rc == PCRE2_ERROR_JIT_BADOPTION) {
      rc = pcre2_match(compiled_->code, subject, text.size(), search_from, PCRE2_NO_UTF_CHECK, data, nullptr);
    }
    if (rc == PCRE2_ERROR_NOMATCH) return;
    FERRY_CHECK(rc >= 0, "regex '", source_, "' failed on a text of ", text.size(), " bytes: ", pcre2_message(rc));
    const PCRE2_SIZE* offsets = pcre2_get_ovector_pointer(data);
    const std::size_t begin = offsets[0], end = offsets[1];
    if (begin == end && end == last_match_end) {
      search_from += search_from < text.size() ? utf8_length(static_cast<unsigned char>(text[search_from])) : 1;
      continue;
    }
    matches.emplace_back(static_cast<std::uint32_t>(begin), static_cast<std::uint32_t>(end));
    search_from = end;
    last_match_end = end;
  }
}

}  // namespace ferry::tokenizer
