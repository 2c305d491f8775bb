// What the data layer accepts from a caller: examples (check_example) and batches (check_batch).
// Both name the bad value, where it is, and what would be valid.

#include <ATen/core/Tensor.h>

#include <string>

#include "ferry/check.h"
#include "ferry/data.h"

namespace ferry::data {
namespace {

// What valid ids are, for messages: "0 to 258 (vocab_size 259)", or "0 and above".
std::string valid_ids(std::optional<int64_t> vocab_size) {
  if (!vocab_size) return "0 and above";
  return detail::concat("0 to ", *vocab_size - 1, " (vocab_size ", *vocab_size, ")");
}

// A dtype as Python writes it, for users of either language: "torch.float32".
std::string dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kBool: return "torch.bool";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    default: return c10::toString(type);
  }
}

std::string shape_of(const at::Tensor& tensor) { return detail::concat(tensor.sizes()); }

// Throws at the first element (in row-major order) where `bad` is true, naming it and its value.
void check_values(const at::Tensor& tensor, const char* name, const at::Tensor& bad, const std::string& valid) {
  if (!bad.any().item<bool>()) return;
  const at::Tensor first = bad.nonzero().select(0, 0).cpu();
  const int64_t row = first[0].item<int64_t>();
  const int64_t column = first[1].item<int64_t>();
  const at::Tensor value = tensor.select(0, row).select(0, column);
  const std::string written = at::isFloatingType(tensor.scalar_type()) ? detail::concat(value.item<double>())
                                                                        : detail::concat(value.item<int64_t>());
  FERRY_CHECK(false, name, "[", row, ", ", column, "] is ", written, ": ", valid);
}

// A tensor that goes with input_ids, one value per token; `what` says what it holds.
void check_companion(const at::Tensor& tensor, const char* name, const at::Tensor& input_ids, const char* what) {
  FERRY_CHECK(tensor.sizes() == input_ids.sizes(), name, " has shape ", shape_of(tensor), " but input_ids ",
              shape_of(input_ids), ": ", name, " holds ", what, ", one per token, so the shapes must be equal");
}

}  // namespace

void check_example(const Example& example, int64_t index, const std::string& source,
                   std::optional<int64_t> vocab_size) {
  const auto tokens = static_cast<int64_t>(example.tokens.size());
  FERRY_CHECK(tokens > 0, "example ", index, " of ", source, " has no tokens: every example needs at least one");
  FERRY_CHECK(example.prompt_tokens >= 0 && example.prompt_tokens <= tokens, "example ", index, " of ", source,
              " has prompt_tokens ", example.prompt_tokens, ": valid are 0 to its ", tokens, " tokens");
  FERRY_CHECK(example.learned.empty() || static_cast<int64_t>(example.learned.size()) == tokens, "example ", index,
              " of ", source, " has ", example.learned.size(), " learned flags for ", tokens,
              " tokens: give one per token, or none");
  const int64_t end = vocab_size.value_or(INT64_MAX);
  for (int64_t position = 0; position < tokens; ++position) {
    const int64_t id = example.tokens[position];
    FERRY_CHECK(id >= 0 && id < end, "token id ", id, " at position ", position, " of example ", index, " of ",
                source, " is out of range: valid ids are ", valid_ids(vocab_size));
  }
}

void check_token_ids(const at::Tensor& ids, const char* name, std::optional<int64_t> vocab_size) {
  FERRY_CHECK(ids.defined(), name, " is missing: give the token ids, an int64 tensor [batch, seq]");
  FERRY_CHECK(at::isIntegralType(ids.scalar_type(), /*includeBool=*/false), name, " is ",
              dtype_name(ids.scalar_type()), ": token ids must be an integer tensor (torch.int64, as tokenizers give "
              "them)");
  FERRY_CHECK(ids.dim() == 2, name, " has shape ", shape_of(ids), ": it must be [batch, seq] (2-D; unsqueeze(0) "
              "makes one sequence a batch of one)");
  FERRY_CHECK(ids.size(0) > 0 && ids.size(1) > 0, name, " has shape ", shape_of(ids),
              ": a batch needs at least one row of at least one token");
  at::Tensor bad = ids.lt(0);
  if (vocab_size) bad = bad.logical_or(ids.ge(*vocab_size));
  check_values(ids, name, bad, "valid token ids are " + valid_ids(vocab_size));
}

void check_batch(const Batch& batch, std::optional<int64_t> vocab_size) {
  check_token_ids(batch.input_ids, "input_ids", vocab_size);
  FERRY_CHECK(batch.labels.defined(), "labels is missing: give labels aligned with input_ids (the tokens where "
              "they are learned, ", kIgnoreIndex, " where not), of shape ", shape_of(batch.input_ids));
  FERRY_CHECK(at::isIntegralType(batch.labels.scalar_type(), /*includeBool=*/false), "labels is ",
              dtype_name(batch.labels.scalar_type()), ": labels must be an integer tensor (torch.int64)");
  check_companion(batch.labels, "labels", batch.input_ids, "the token learned at each position (aligned, not shifted)");
  at::Tensor bad_label = batch.labels.lt(0);
  if (vocab_size) bad_label = bad_label.logical_or(batch.labels.ge(*vocab_size));
  check_values(batch.labels, "labels", bad_label.logical_and(batch.labels.ne(kIgnoreIndex)),
               detail::concat("valid labels are ", kIgnoreIndex, " (not learned) and token ids ",
                              valid_ids(vocab_size)));
  if (batch.attention_mask.defined()) {
    const at::Tensor& mask = batch.attention_mask;
    FERRY_CHECK(!at::isComplexType(mask.scalar_type()), "attention_mask is ", dtype_name(mask.scalar_type()),
                ": it must be bool or integer, 1 at real tokens and 0 at padding");
    check_companion(mask, "attention_mask", batch.input_ids, "1 at a real token and 0 at padding");
    check_values(mask, "attention_mask", mask.ne(0).logical_and(mask.ne(1)),
                 "valid are 1 (a real token) and 0 (padding)");
  }
  if (batch.position_ids.defined()) {
    const at::Tensor& positions = batch.position_ids;
    FERRY_CHECK(at::isIntegralType(positions.scalar_type(), /*includeBool=*/false), "position_ids is ",
                dtype_name(positions.scalar_type()), ": positions must be an integer tensor (torch.int64)");
    check_companion(positions, "position_ids", batch.input_ids, "each token's position in its document");
    check_values(positions, "position_ids", positions.lt(0), "positions count from 0");
  }
}

}  // namespace ferry::data
