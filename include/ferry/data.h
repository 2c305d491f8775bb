#pragma once

// ferry's data layer: token sources, text and instruction/chat datasets tokenized with a model's
// own tokenizer (ferry/tokenizer.h) or the byte-level one, a loader that packs or pads examples
// into batches with seeded shuffling and an exact resume position, and the built-in demo task with
// its metrics. It knows nothing of models: the engine hands these batches to
// whatever layered model it drives. docs/data.md describes the formats.
//
// Note: labels follow the Hugging Face convention. They are aligned with input_ids, not
// shifted: labels[t] is the token at position t, or kIgnoreIndex where it is not to be
// learned, and the loss compares logits[t - 1] with labels[t].

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/tokenizer.h"

namespace ferry::data {

constexpr int64_t kIgnoreIndex = -100;

// One training example: a document, a prompt followed by its completion, or a conversation.
struct Example {
  std::vector<int64_t> tokens;
  int64_t prompt_tokens = 0;  // leading tokens that answer-only training never learns
  // Per token, whether answer-only training learns it (a conversation's assistant turns). Empty:
  // every token from prompt_tokens on is learned.
  std::vector<std::uint8_t> learned;
};

// 256 byte tokens followed by three special tokens. A model with a larger vocabulary trains on
// these ids unchanged; it simply never sees the ids above kVocabSize.
class ByteTokenizer {
 public:
  static constexpr int64_t kBos = 256;
  static constexpr int64_t kEos = 257;
  static constexpr int64_t kPad = 258;
  static constexpr int64_t kVocabSize = 259;

  std::vector<int64_t> encode(std::string_view text) const;
  // The inverse of encode: special tokens are dropped, ids outside the vocabulary throw.
  std::string decode(const std::vector<int64_t>& ids) const;

  // BOS text EOS, with no prompt.
  Example encode_document(std::string_view text) const;
  // BOS prompt completion EOS, where BOS and the prompt are the example's prompt tokens.
  Example encode_prompt_completion(std::string_view prompt, std::string_view completion) const;
};

// Random access to examples. get() must return a non-empty example for every index below
// size(), the same one each time, and may be called from one thread at a time.
class Dataset {
 public:
  virtual ~Dataset() = default;
  virtual int64_t size() const = 0;
  virtual Example get(int64_t index) const = 0;
  // Names the source in error messages: its path, or what generated it.
  virtual const std::string& name() const = 0;
};

enum class TokenDtype { kUint16, kUint32 };

// ".u32.bin" and ".uint32.bin" hold uint32 tokens; any other ".bin" holds uint16 (nanoGPT's
// format, enough for vocabularies up to 65536). Throws for a path not ending in ".bin".
TokenDtype token_dtype_from_path(const std::string& path);

// A flat array of little-endian tokens with no header, memory-mapped. Its examples are
// consecutive windows of example_tokens tokens; the last one may be shorter. The dtype is
// token_dtype_from_path(path) unless given.
std::shared_ptr<const Dataset> open_token_file(const std::string& path, int64_t example_tokens,
                                               std::optional<TokenDtype> dtype = std::nullopt);

// How a text source's records become examples (docs/data.md). kAuto tells each record by its keys:
// "messages" (OpenAI chat), "conversations" (ShareGPT), "instruction" (Alpaca), "prompt" and
// "completion", or "text".
enum class DataFormat { kAuto, kText, kPromptCompletion, kAlpaca, kMessages, kShareGpt };
const char* to_string(DataFormat format);
// "auto", "text", "prompt-completion", "alpaca", "messages", "sharegpt".
DataFormat parse_data_format(const std::string& name);

// What tokenizes a text source.
struct TextOptions {
  // Null: ferry::byte_tokenizer().
  std::shared_ptr<const Tokenizer> tokenizer;
  DataFormat format = DataFormat::kAuto;
  // The chat template of conversations (alpaca, messages, sharegpt), by ChatTemplate name. Empty:
  // the tokenizer's own when it is a known one (an unknown one is refused), else plain. When set,
  // prompt/completion records are rendered as one user and one assistant turn too; otherwise they
  // are the prompt's text followed by the completion's.
  std::string chat_template;
};

// A document: BOS (when the tokenizer adds one), the text, EOS (when the tokenizer has one).
Example encode_document(const Tokenizer& tokenizer, std::string_view text);
// BOS, prompt and completion tokenized as one text, EOS; the tokens that start in the prompt (and
// BOS) are the prompt tokens.
Example encode_prompt_completion(const Tokenizer& tokenizer, std::string_view prompt, std::string_view completion);
// The conversation rendered by the template and tokenized as one text; a token is learned when it
// starts inside an assistant turn or the token ending it. Throws when no turn is learned.
Example encode_conversation(const Tokenizer& tokenizer, const ChatTemplate& chat, const std::vector<ChatMessage>& messages);

// JSON Lines (.jsonl: one record per non-empty line) or JSON (.json: an array of records). Records
// are tokenized on every core. A record that does not fit its format is an error naming the file,
// the line (JSON Lines) or index (JSON) and the field (`data.jsonl:3: field "messages"[1]["role"]
// is "tool" ...`).
std::shared_ptr<const Dataset> open_records(const std::string& path, const TextOptions& options = {});
// JSON Lines; kept for callers of the byte-tokenized API: open_records.
std::shared_ptr<const Dataset> open_jsonl(const std::string& path);

// Plain text: documents are separated by one or more blank lines.
std::shared_ptr<const Dataset> open_text(const std::string& path, const TextOptions& options = {});

// Chooses the source by extension: ".bin" a token file, ".jsonl" and ".json" records, otherwise
// text.
std::shared_ptr<const Dataset> open_dataset(const std::string& path, int64_t example_tokens,
                                            const TextOptions& options = {});

// Counts over a dataset, for the warnings a job prints before it trains.
struct DatasetSummary {
  int64_t examples = 0;
  int64_t tokens = 0;
  int64_t longest = 0;         // tokens of the longest example
  int64_t longer_than = 0;     // examples with more tokens than the length asked about
  int64_t learned_tokens = 0;  // tokens answer-only training learns
};
DatasetSummary summarize(const Dataset& dataset, int64_t sequence_length);

// Throws ferry::Error unless a loader can read `example`: at least one token, prompt_tokens within
// its tokens, one learned flag per token or none, every id in [0, vocab_size) (without vocab_size,
// non-negative). The message places it as example `index` of `source` (a dataset's name).
void check_example(const Example& example, int64_t index, const std::string& source,
                   std::optional<int64_t> vocab_size = std::nullopt);

// Examples held in memory, each checked by check_example when the dataset is made.
std::shared_ptr<const Dataset> make_dataset(std::string name, std::vector<Example> examples,
                                            std::optional<int64_t> vocab_size = std::nullopt);

struct LoaderOptions {
  int64_t batch_size = 8;
  int64_t sequence_length = 256;
  // Packing concatenates examples into full rows; an example that does not fit continues at
  // the start of the next row. Without packing each row holds one example, truncated to
  // sequence_length or padded to it.
  bool pack = true;
  bool answer_only = false;  // labels are kIgnoreIndex on every prompt token
  bool shuffle = true;       // a new permutation of the examples every epoch
  uint64_t seed = 0;
  std::optional<int64_t> vocab_size;  // when set, every token id must be below it
  int64_t pad_token = ByteTokenizer::kPad;
  // One pass over the examples, for evaluation: once the last example is out, the rest of the
  // batch is padding (every label kIgnoreIndex) and finished() is true.
  bool single_pass = false;
};

// All int64 [batch_size, sequence_length].
struct Batch {
  at::Tensor input_ids;
  at::Tensor labels;          // aligned with input_ids; kIgnoreIndex where nothing is learned
  at::Tensor attention_mask;  // 1 for real tokens, 0 for padding (never 0 when packing)
  at::Tensor position_ids;    // 0 at each example's start and at each row's start
};

// Throws ferry::Error, naming the tensor, unless `batch` is one a model can train on: input_ids and
// labels integer tensors of one shape [batch, seq] with at least one row and one column;
// attention_mask and position_ids undefined or of that shape too, the mask holding only 1 (a real
// token) and 0 (padding), the positions integers from 0; input ids in [0, vocab_size) and labels
// there or kIgnoreIndex (without vocab_size, non-negative). A bad value is named with its place:
// `input_ids[1, 7] is 300: valid token ids are 0 to 258 (vocab_size 259)`. The engine checks every
// batch it is handed with the model's vocabulary (Engine::vocab_size).
void check_batch(const Batch& batch, std::optional<int64_t> vocab_size = std::nullopt);
// The same for one tensor of token ids [batch, seq], called `name` in the message.
void check_token_ids(const at::Tensor& ids, const char* name, std::optional<int64_t> vocab_size = std::nullopt);

// Uniformly random tokens, labels equal to the inputs and no padding: a batch of the right shape
// for benchmarks, where what is learned does not matter. Deterministic for a seed.
Batch random_batch(int64_t batch, int64_t seq, int64_t vocab_size, uint64_t seed);

// Data parallelism: rank `rank`'s rows of a batch that all `world_size` ranks read whole, rows
// [rank * b, (rank + 1) * b) with b = rows / world_size. So which examples a step sees does not
// depend on the world size. Throws ferry::Error when the rows do not divide evenly.
Batch rank_rows(const Batch& batch, int64_t rank, int64_t world_size);

// Where a loader is in its endless stream of examples, plus what it must match on restore.
struct LoaderState {
  int64_t epoch = 0;         // completed passes over the dataset
  int64_t position = 0;      // index, in this epoch's order, of the next example to read
  int64_t token_offset = 0;  // tokens of that example already emitted (only when packing)
  uint64_t seed = 0;
  bool shuffle = true;
  int64_t dataset_size = 0;

  std::string to_json() const;
  static LoaderState from_json(const std::string& json);
};

// An endless stream of batches: after the last example of an epoch comes the first of the
// next epoch's order, within the same batch if need be.
class DataLoader {
 public:
  DataLoader(std::shared_ptr<const Dataset> dataset, LoaderOptions options);

  Batch next();
  // With single_pass: every example is out, and next() would refuse.
  bool finished() const { return options_.single_pass && epoch_ > 0; }

  // The batches after restore(state()) are identical to the ones an uninterrupted loader
  // gives, also in a new process. Batch size and sequence length may change in between.
  LoaderState state() const;
  void restore(const LoaderState& state);

  const LoaderOptions& options() const { return options_; }
  const Dataset& dataset() const { return *dataset_; }

 private:
  const Example& current_example();
  void advance_example();
  void fill_packed_row(int64_t* tokens, int64_t* labels, int64_t* mask, int64_t* positions);
  void fill_padded_row(int64_t* tokens, int64_t* labels, int64_t* mask, int64_t* positions);

  std::shared_ptr<const Dataset> dataset_;
  LoaderOptions options_;
  int64_t epoch_ = 0;
  int64_t position_ = 0;
  int64_t token_offset_ = 0;
  std::vector<int64_t> order_;              // this epoch's permutation of the example indices
  std::optional<Example> current_example_;  // order_[position_], once read
};

// The built-in fine-tuning task: addition of two numbers of 1 to max_digits digits each,
// written with leading zeros to a fixed width: with max_digits 2, prompt "07+68=" and
// completion "075". Every digit then has a fixed position, which a small model learns in a
// few hundred steps (docs/data.md). A problem's split follows from a hash of the problem and
// the seed, so the train and eval problems of one seed never overlap.
struct AdditionTask {
  int64_t max_digits = 2;
  uint64_t seed = 0;
};

enum class Split { kTrain, kEval };

struct PromptCompletion {
  std::string prompt;
  std::string completion;
};

// count problems of one split, drawn with replacement; the same for the same task and count.
std::vector<PromptCompletion> addition_problems(const AdditionTask& task, Split split,
                                                int64_t count);

// The problems byte-tokenized with encode_prompt_completion, for answer-only training.
std::shared_ptr<const Dataset> addition_dataset(const AdditionTask& task, Split split,
                                                int64_t count);

// Greedy generation by the model under evaluation: the new token ids after prompt, at most
// max_new_tokens of them. Generation may stop early at ByteTokenizer::kEos.
using GenerateFn = std::function<std::vector<int64_t>(const std::vector<int64_t>& prompt,
                                                      int64_t max_new_tokens)>;

// The fraction of problems whose generated answer, up to its first EOS, is exactly the
// completion. Each prompt is BOS prompt, as in training.
double exact_match_accuracy(const std::vector<PromptCompletion>& problems,
                            const GenerateFn& generate);

// The same for several prompts per call, at most batch_size, answered in order. The addition
// task's prompts all have one length, so they batch without padding.
using BatchGenerateFn = std::function<std::vector<std::vector<int64_t>>(
    const std::vector<std::vector<int64_t>>& prompts, int64_t max_new_tokens)>;
double exact_match_accuracy(const std::vector<PromptCompletion>& problems,
                            const BatchGenerateFn& generate, int64_t batch_size);

struct AnswerAccuracy {
  double token_accuracy = 0;  // learned positions whose argmax prediction is right
  double row_accuracy = 0;    // rows with a learned position where every one is right
  int64_t answer_tokens = 0;
  int64_t answer_rows = 0;
};

// Teacher-forced accuracy from one forward pass, without generation: logits [B, T, V] are
// compared with labels [B, T] shifted by one, as the loss does. With answer-only labels
// and one problem per row, row_accuracy is the exact-match accuracy under teacher forcing.
AnswerAccuracy teacher_forced_accuracy(const at::Tensor& logits, const at::Tensor& labels);

}  // namespace ferry::data
