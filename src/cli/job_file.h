#pragma once

// Job files for `ferry finetune --config`: YAML (.yaml, .yml) or JSON, read into one JSON object
// so that the rest of the CLI sees a single format.

#include <string>

#include <nlohmann/json.hpp>

namespace ferry::cli {

// The top-level mapping of the job file at `path`. YAML's plain scalars are typed by the YAML
// 1.2 core schema (null, true/false, integers, floats, else text); quoted scalars stay text.
// Throws ferry::Error naming the file, and the line and column for a syntax error.
nlohmann::json read_job_file(const std::string& path);

}  // namespace ferry::cli
