#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "ferry/memory.h"

namespace ferry {

std::string format_bytes(uint64_t bytes) {
  static const char* const kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024 && unit < 5) {
    value /= 1024;
    ++unit;
  }
  char text[32];
  std::snprintf(text, sizeof text, unit == 0 ? "%.0f %s" : "%.2f %s", value, kUnits[unit]);
  return text;
}

// Note: sizes are refused rather than rounded where rounding changes their meaning: a size
// below one byte would become 0, which budgets read as "no limit", and one of 2^63 bytes or more
// does not fit the signed offsets that files and tensors use.
uint64_t parse_bytes(const std::string& text) {
  static const struct {
    const char* suffix;
    double scale;
  } kSuffixes[] = {{"", 1},          {"b", 1},         {"k", 1e3},       {"kb", 1e3},
                   {"kib", 1024.0},  {"m", 1e6},       {"mb", 1e6},      {"mib", 1048576.0},
                   {"g", 1e9},       {"gb", 1e9},      {"gib", 1073741824.0},
                   {"t", 1e12},      {"tb", 1e12},     {"tib", 1099511627776.0}};
  const char* begin = text.c_str();
  char* end = nullptr;
  const double number = std::strtod(begin, &end);
  const bool read_number = end != begin && std::isfinite(number) && number >= 0;
  std::string suffix;
  for (const char* c = end; read_number && *c != '\0'; ++c) {
    if (!std::isspace(static_cast<unsigned char>(*c))) {
      suffix += static_cast<char>(std::tolower(static_cast<unsigned char>(*c)));
    }
  }
  for (const auto& candidate : kSuffixes) {
    if (!read_number || suffix != candidate.suffix) continue;
    const double bytes = number * candidate.scale;
    FERRY_CHECK(bytes < 9223372036854775808.0, "size '", text, "' is 2^63 bytes (8 EiB) or more: give a smaller size");
    FERRY_CHECK(bytes == 0 || bytes >= 1, "size '", text, "' is less than one byte, which would round to 0: give 0 or ",
                "a size such as 4096, 512MiB or 24GiB");
    FERRY_CHECK(candidate.scale > 1 || bytes == std::floor(bytes), "size '", text, "' is not a whole number of bytes: ",
                "give an integer, or a unit such as 1.5GiB");
    return static_cast<uint64_t>(std::llround(bytes));
  }
  throw Error(detail::concat("cannot read '", text,
                             "' as a size: write a number >= 0 with an optional unit, such as 4096, "
                             "512MiB, 24GiB or 1.5GB (below 2^63 bytes)"));
}

}  // namespace ferry
