#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/randint.h>

#include <algorithm>

#include <nlohmann/json.hpp>

#include "data/shuffle.h"
#include "ferry/check.h"
#include "ferry/data.h"

namespace ferry::data {
namespace {

int64_t token_count(const Example& example) {
  return static_cast<int64_t>(example.tokens.size());
}

bool is_learned(const Example& example, int64_t token_index, bool answer_only) {
  if (!answer_only) return true;
  if (!example.learned.empty()) return example.learned[token_index] != 0;
  return token_index >= example.prompt_tokens;
}

int64_t json_int(const nlohmann::json& state, const char* field) {
  FERRY_CHECK(state.contains(field) && state.at(field).is_number_integer(),
              "loader state is missing the integer field \"", field, "\": ", state.dump());
  return state.at(field).get<int64_t>();
}

}  // namespace

std::string LoaderState::to_json() const {
  nlohmann::json state = {{"epoch", epoch},   {"position", position},
                          {"token_offset", token_offset}, {"seed", seed},
                          {"shuffle", shuffle}, {"dataset_size", dataset_size}};
  return state.dump();
}

LoaderState LoaderState::from_json(const std::string& json) {
  nlohmann::json state = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
  FERRY_CHECK(state.is_object(), "loader state is not a JSON object: ", json);
  FERRY_CHECK(state.contains("seed") && state.at("seed").is_number_unsigned(),
              "loader state is missing the unsigned integer field \"seed\": ", json);
  FERRY_CHECK(state.contains("shuffle") && state.at("shuffle").is_boolean(),
              "loader state is missing the boolean field \"shuffle\": ", json);
  LoaderState result;
  result.epoch = json_int(state, "epoch");
  result.position = json_int(state, "position");
  result.token_offset = json_int(state, "token_offset");
  result.seed = state.at("seed").get<uint64_t>();
  result.shuffle = state.at("shuffle").get<bool>();
  result.dataset_size = json_int(state, "dataset_size");
  return result;
}

DataLoader::DataLoader(std::shared_ptr<const Dataset> dataset, LoaderOptions options)
    : dataset_(std::move(dataset)), options_(options) {
  FERRY_CHECK(dataset_ != nullptr, "DataLoader needs a dataset, got a null pointer");
  FERRY_CHECK(dataset_->size() > 0, "dataset ", dataset_->name(), " has no examples");
  FERRY_CHECK(options_.batch_size > 0, "batch_size is ", options_.batch_size,
              ": it must be at least 1");
  FERRY_CHECK(options_.sequence_length >= 2, "sequence_length is ", options_.sequence_length,
              ": it must be at least 2, or no token has one before it to predict it from");
  if (options_.vocab_size) {
    FERRY_CHECK(*options_.vocab_size > 0, "vocab_size is ", *options_.vocab_size,
                ": it must be at least 1");
  }
  int64_t vocab_size = options_.vocab_size.value_or(INT64_MAX);
  FERRY_CHECK(options_.pad_token >= 0 && options_.pad_token < vocab_size, "pad_token is ",
              options_.pad_token, ": valid ids are 0 to ", vocab_size - 1);
  order_ = epoch_order(dataset_->size(), options_.seed, epoch_, options_.shuffle);
}

Batch random_batch(int64_t batch, int64_t seq, int64_t vocab_size, uint64_t seed) {
  FERRY_CHECK(batch > 0 && seq > 0 && vocab_size > 0, "random_batch needs a positive shape and vocabulary; got batch ",
              batch, ", seq ", seq, ", vocab_size ", vocab_size);
  at::Generator generator = at::detail::createCPUGenerator(seed);
  Batch out;
  out.input_ids = at::randint(vocab_size, {batch, seq}, generator, at::kLong);
  out.labels = out.input_ids.clone();
  out.attention_mask = at::ones({batch, seq}, at::kLong);
  return out;
}

Batch rank_rows(const Batch& batch, int64_t rank, int64_t world_size) {
  FERRY_CHECK(world_size >= 1 && rank >= 0 && rank < world_size, "rank ", rank, " is not in a world of size ",
              world_size);
  const int64_t rows = batch.input_ids.size(0);
  FERRY_CHECK(rows % world_size == 0, "a batch of ", rows, " rows does not split evenly over ", world_size,
              " ranks: the global batch is the per-rank batch times the world size");
  const int64_t per_rank = rows / world_size;
  auto slice = [&](const at::Tensor& t) { return t.defined() ? t.narrow(0, rank * per_rank, per_rank) : t; };
  return {slice(batch.input_ids), slice(batch.labels), slice(batch.attention_mask), slice(batch.position_ids)};
}

Batch DataLoader::next() {
  FERRY_CHECK(!finished(), "the single pass over ", dataset_->name(), " is over: every example was in an earlier batch");
  const int64_t rows = options_.batch_size;
  const int64_t columns = options_.sequence_length;
  Batch batch;
  batch.input_ids = at::empty({rows, columns}, at::kLong);
  batch.labels = at::empty({rows, columns}, at::kLong);
  batch.attention_mask = at::empty({rows, columns}, at::kLong);
  batch.position_ids = at::empty({rows, columns}, at::kLong);
  for (int64_t row = 0; row < rows; ++row) {
    int64_t* tokens = batch.input_ids.data_ptr<int64_t>() + row * columns;
    int64_t* labels = batch.labels.data_ptr<int64_t>() + row * columns;
    int64_t* mask = batch.attention_mask.data_ptr<int64_t>() + row * columns;
    int64_t* positions = batch.position_ids.data_ptr<int64_t>() + row * columns;
    if (options_.pack) {
      fill_packed_row(tokens, labels, mask, positions);
    } else {
      fill_padded_row(tokens, labels, mask, positions);
    }
  }
  return batch;
}

namespace {

// Padding after the last example of a single pass: the pad token, nothing learned, masked out.
void pad_columns(int64_t begin, int64_t end, int64_t pad_token, int64_t* tokens, int64_t* labels, int64_t* mask,
                 int64_t* positions) {
  for (int64_t column = begin; column < end; ++column) {
    tokens[column] = pad_token;
    labels[column] = kIgnoreIndex;
    mask[column] = 0;
    positions[column] = column - begin;
  }
}

}  // namespace

void DataLoader::fill_packed_row(int64_t* tokens, int64_t* labels, int64_t* mask, int64_t* positions) {
  const int64_t columns = options_.sequence_length;
  std::fill(mask, mask + columns, 1);
  for (int64_t column = 0; column < columns;) {
    if (finished()) {
      pad_columns(column, columns, options_.pad_token, tokens, labels, mask, positions);
      return;
    }
    const Example& example = current_example();
    int64_t count = std::min(columns - column, token_count(example) - token_offset_);
    for (int64_t i = 0; i < count; ++i) {
      int64_t token_index = token_offset_ + i;
      int64_t token = example.tokens[token_index];
      tokens[column + i] = token;
      labels[column + i] = is_learned(example, token_index, options_.answer_only) ? token
                                                                                 : kIgnoreIndex;
      positions[column + i] = i;
    }
    column += count;
    token_offset_ += count;
    if (token_offset_ == token_count(example)) {
      advance_example();
    }
  }
}

// Note: an example only starts part-way (token_offset_ > 0) after restoring a packing
// loader's state into one that pads; the row then holds the rest of that example.
void DataLoader::fill_padded_row(int64_t* tokens, int64_t* labels, int64_t* mask,
                                 int64_t* positions) {
  const int64_t columns = options_.sequence_length;
  if (finished()) {
    pad_columns(0, columns, options_.pad_token, tokens, labels, mask, positions);
    return;
  }
  const Example& example = current_example();
  int64_t count = std::min(columns, token_count(example) - token_offset_);
  for (int64_t column = 0; column < columns; ++column) {
    positions[column] = column;
    if (column < count) {
      int64_t token_index = token_offset_ + column;
      int64_t token = example.tokens[token_index];
      tokens[column] = token;
      labels[column] = is_learned(example, token_index, options_.answer_only) ? token
                                                                             : kIgnoreIndex;
      mask[column] = 1;
    } else {
      tokens[column] = options_.pad_token;
      labels[column] = kIgnoreIndex;
      mask[column] = 0;
    }
  }
  advance_example();
}

const Example& DataLoader::current_example() {
  if (!current_example_) {
    int64_t index = order_[position_];
    Example example = dataset_->get(index);
    check_example(example, index, dataset_->name(), options_.vocab_size);
    current_example_ = std::move(example);
  }
  return *current_example_;
}

void DataLoader::advance_example() {
  current_example_.reset();
  token_offset_ = 0;
  if (++position_ == dataset_->size()) {
    ++epoch_;
    position_ = 0;
    order_ = epoch_order(dataset_->size(), options_.seed, epoch_, options_.shuffle);
  }
}

LoaderState DataLoader::state() const {
  LoaderState state;
  state.epoch = epoch_;
  state.position = position_;
  state.token_offset = token_offset_;
  state.seed = options_.seed;
  state.shuffle = options_.shuffle;
  state.dataset_size = dataset_->size();
  return state;
}

void DataLoader::restore(const LoaderState& state) {
  FERRY_CHECK(state.dataset_size == dataset_->size(), "loader state is for a dataset of ",
              state.dataset_size, " examples, but ", dataset_->name(), " has ",
              dataset_->size());
  FERRY_CHECK(state.seed == options_.seed, "loader state is for seed ", state.seed,
              ", but this loader's seed is ", options_.seed);
  FERRY_CHECK(state.shuffle == options_.shuffle, "loader state is for shuffle=", state.shuffle,
              ", but this loader has shuffle=", options_.shuffle);
  FERRY_CHECK(state.epoch >= 0, "loader state has epoch ", state.epoch,
              ": valid are 0 and above");
  FERRY_CHECK(state.position >= 0 && state.position < dataset_->size(),
              "loader state has position ", state.position, ": valid are 0 to ",
              dataset_->size() - 1);
  std::vector<int64_t> order =
      epoch_order(dataset_->size(), options_.seed, state.epoch, options_.shuffle);
  int64_t index = order[state.position];
  Example example = dataset_->get(index);
  check_example(example, index, dataset_->name(), options_.vocab_size);
  FERRY_CHECK(state.token_offset >= 0 && state.token_offset < token_count(example),
              "loader state has token_offset ", state.token_offset, ": example ", index, " of ",
              dataset_->name(), " has ", token_count(example), " tokens");
  epoch_ = state.epoch;
  position_ = state.position;
  token_offset_ = state.token_offset;
  order_ = std::move(order);
  current_example_ = std::move(example);
}

}  // namespace ferry::data
