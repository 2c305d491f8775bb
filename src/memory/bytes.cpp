#include <cctype>
#include <cmath>
#include <cstdio>

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

uint64_t parse_bytes(const std::string& text) {
  static const struct {
    const char* suffix;
    double scale;
  } kSuffixes[] = {{"", 1},          {"b", 1},         {"k", 1e3},       {"kb", 1e3},
                   {"kib", 1024.0},  {"m", 1e6},       {"mb", 1e6},      {"mib", 1048576.0},
                   {"g", 1e9},       {"gb", 1e9},      {"gib", 1073741824.0},
                   {"t", 1e12},      {"tb", 1e12},     {"tib", 1099511627776.0}};
  size_t end = 0;
  double number = 0;
  try {
    number = std::stod(text, &end);
  } catch (const std::exception&) {
    end = 0;
  }
  std::string suffix;
  for (size_t i = end; i < text.size(); ++i) {
    if (!std::isspace(static_cast<unsigned char>(text[i]))) {
      suffix += static_cast<char>(std::tolower(static_cast<unsigned char>(text[i])));
    }
  }
  for (const auto& candidate : kSuffixes) {
    if (end > 0 && suffix == candidate.suffix && number >= 0 && std::isfinite(number)) {
      return static_cast<uint64_t>(std::llround(number * candidate.scale));
    }
  }
  throw Error(detail::concat("cannot read '", text,
                             "' as a size: write a number with an optional unit, such as 4096, "
                             "512MiB, 24GiB or 1.5GB"));
}

}  // namespace ferry
