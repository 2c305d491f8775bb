#pragma once

// A Hugging Face tokenizer.json: added tokens, normalizer, pre-tokenizer, BPE model,
// post-processor and decoder, each as the reference (tokenizers 0.23) computes it.

#include <memory>
#include <string>

#include "ferry/tokenizer.h"

namespace ferry::tokenizer {

// Parses the file; throws ferry::Error naming the file, the component and what is supported.
std::unique_ptr<Tokenizer> read_tokenizer_json(const std::string& path);

}  // namespace ferry::tokenizer
