#include "cli/job_file.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <regex>
#include <sstream>

#include <yaml-cpp/yaml.h>

#include "ferry/check.h"

namespace ferry::cli {
namespace {

using Json = nlohmann::json;

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// A plain (unquoted) scalar under the YAML 1.2 core schema.
Json plain_scalar(const std::string& text) {
  static const std::regex kNull("~|null|Null|NULL|");
  static const std::regex kTrue("true|True|TRUE");
  static const std::regex kFalse("false|False|FALSE");
  static const std::regex kInteger("[-+]?[0-9]+");
  static const std::regex kHex("0x[0-9a-fA-F]+");
  static const std::regex kFloat("[-+]?(\\.[0-9]+|[0-9]+(\\.[0-9]*)?)([eE][-+]?[0-9]+)?");
  static const std::regex kInfinity("[-+]?\\.(inf|Inf|INF)");
  static const std::regex kNan("\\.(nan|NaN|NAN)");
  if (std::regex_match(text, kNull)) return nullptr;
  if (std::regex_match(text, kTrue)) return true;
  if (std::regex_match(text, kFalse)) return false;
  if (std::regex_match(text, kInteger) || std::regex_match(text, kHex)) {
    errno = 0;
    const long long value = std::strtoll(text.c_str(), nullptr, 0);
    if (errno == 0) return value;
  }
  if (std::regex_match(text, kFloat)) return std::strtod(text.c_str(), nullptr);
  if (std::regex_match(text, kInfinity)) {
    return text[0] == '-' ? -std::numeric_limits<double>::infinity() : std::numeric_limits<double>::infinity();
  }
  if (std::regex_match(text, kNan)) return std::numeric_limits<double>::quiet_NaN();
  return text;
}

Json to_json(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Null:
    case YAML::NodeType::Undefined: return nullptr;
    case YAML::NodeType::Scalar: return node.Tag() == "!" ? Json(node.Scalar()) : plain_scalar(node.Scalar());
    case YAML::NodeType::Sequence: {
      Json array = Json::array();
      for (const YAML::Node& item : node) array.push_back(to_json(item));
      return array;
    }
    case YAML::NodeType::Map: {
      Json object = Json::object();
      for (const auto& item : node) object[item.first.as<std::string>()] = to_json(item.second);
      return object;
    }
  }
  return nullptr;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  FERRY_CHECK(in.good(), "cannot read job file '", path, "': ", std::strerror(errno));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

Json read_job_file(const std::string& path) {
  const std::string text = read_text(path);
  const bool yaml = ends_with(path, ".yaml") || ends_with(path, ".yml");
  Json job;
  if (yaml) {
    try {
      job = to_json(YAML::Load(text));
    } catch (const YAML::Exception& error) {
      throw Error(detail::concat("job file '", path, "' is not valid YAML: line ", error.mark.line + 1,
                                 ", column ", error.mark.column + 1, ": ", error.msg));
    }
  } else {
    try {
      job = Json::parse(text);
    } catch (const Json::exception& error) {
      throw Error(detail::concat("job file '", path, "' is not valid JSON (name a YAML file *.yaml or *.yml): ",
                                 error.what()));
    }
  }
  FERRY_CHECK(job.is_object(), "job file '", path, "' must hold a mapping of settings (key: value), not ",
              job.type_name());
  return job;
}

}  // namespace ferry::cli
