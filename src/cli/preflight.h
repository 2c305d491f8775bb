#pragma once

// What `ferry finetune` checks before it reads any weight, beyond the settings: a typo in a
// path or a bad token id should cost seconds, not the load of a large model.

#include <cstdint>
#include <string>

namespace ferry::cli {

// Reads every id of the token file at `path` (uint16 or uint32 by its name, as
// data::token_dtype_from_path) in one pass, in parallel for a large file, and throws
// ferry::Error naming the first id >= vocab_size, its position and the vocabulary.
void check_token_ids(const std::string& path, std::int64_t vocab_size);

// Throws ferry::Error unless a file can be created in `directory`, or in the nearest existing
// directory above it (which the export creates the rest under). `what` names the setting.
void check_writable(const std::string& directory, const std::string& what);

}  // namespace ferry::cli
