#include "support/catch.h"

#include <algorithm>
#include <cstdint>
#include <ostream>
#include <vector>

#include "data/shuffle.h"
#include "ferry/check.h"
#include "ferry/data.h"

namespace {

using ferry::data::Batch;
using ferry::data::DataLoader;
using ferry::data::Example;
using ferry::data::LoaderOptions;
using ferry::data::LoaderState;
using Catch::Matchers::Contains;
using Rows = std::vector<std::vector<int64_t>>;

constexpr int64_t kIgnore = ferry::data::kIgnoreIndex;
constexpr int64_t kPad = ferry::data::ByteTokenizer::kPad;

Rows rows_of(const at::Tensor& tensor) {
  REQUIRE(tensor.dim() == 2);
  REQUIRE(tensor.scalar_type() == at::kLong);
  Rows rows(tensor.size(0));
  const int64_t* data = tensor.data_ptr<int64_t>();
  for (int64_t row = 0; row < tensor.size(0); ++row) {
    rows[row].assign(data + row * tensor.size(1), data + (row + 1) * tensor.size(1));
  }
  return rows;
}

struct BatchRows {
  Rows input_ids, labels, attention_mask, position_ids;
  bool operator==(const BatchRows& other) const {
    return input_ids == other.input_ids && labels == other.labels &&
           attention_mask == other.attention_mask && position_ids == other.position_ids;
  }
};

// Catch2 prints the batches of a failed comparison.
std::ostream& operator<<(std::ostream& out, const BatchRows& batch) {
  auto print = [&](const char* name, const Rows& rows) {
    out << name << ":";
    for (const auto& row : rows) {
      out << " [";
      for (int64_t value : row) {
        out << " " << value;
      }
      out << " ]";
    }
    out << "\n";
  };
  print("input_ids", batch.input_ids);
  print("labels", batch.labels);
  print("attention_mask", batch.attention_mask);
  print("position_ids", batch.position_ids);
  return out;
}

BatchRows rows_of(const Batch& batch) {
  return {rows_of(batch.input_ids), rows_of(batch.labels), rows_of(batch.attention_mask),
          rows_of(batch.position_ids)};
}

std::vector<BatchRows> next_batches(DataLoader& loader, int count) {
  std::vector<BatchRows> batches;
  for (int i = 0; i < count; ++i) {
    batches.push_back(rows_of(loader.next()));
  }
  return batches;
}

// Three examples of 3, 5 and 2 tokens; the middle one has a two-token prompt.
std::shared_ptr<const ferry::data::Dataset> three_examples() {
  return ferry::data::make_dataset(
      "three", {Example{{1, 2, 3}, 0}, Example{{4, 5, 6, 7, 8}, 2}, Example{{9, 10}, 0}});
}

LoaderOptions in_order(int64_t batch_size, int64_t sequence_length, bool pack) {
  LoaderOptions options;
  options.batch_size = batch_size;
  options.sequence_length = sequence_length;
  options.pack = pack;
  options.shuffle = false;
  return options;
}

}  // namespace

TEST_CASE("packing fills whole rows and carries examples over rows and epochs") {
  DataLoader loader(three_examples(), in_order(2, 4, /*pack=*/true));
  BatchRows first = rows_of(loader.next());
  CHECK(first.input_ids == Rows{{1, 2, 3, 4}, {5, 6, 7, 8}});
  CHECK(first.labels == first.input_ids);
  CHECK(first.attention_mask == Rows{{1, 1, 1, 1}, {1, 1, 1, 1}});
  CHECK(first.position_ids == Rows{{0, 1, 2, 0}, {0, 1, 2, 3}});
  BatchRows second = rows_of(loader.next());
  CHECK(second.input_ids == Rows{{9, 10, 1, 2}, {3, 4, 5, 6}});
  CHECK(second.position_ids == Rows{{0, 1, 0, 1}, {0, 0, 1, 2}});
  CHECK(loader.state().epoch == 1);
}

TEST_CASE("packed rows are the epoch-ordered stream of examples cut into rows") {
  auto dataset = ferry::data::addition_dataset({2, 8}, ferry::data::Split::kTrain, 9);
  LoaderOptions options;
  options.batch_size = 3;
  options.sequence_length = 7;
  options.seed = 21;
  std::vector<int64_t> stream;
  for (int64_t epoch = 0; epoch < 4; ++epoch) {
    for (int64_t index : ferry::data::epoch_order(dataset->size(), options.seed, epoch, true)) {
      std::vector<int64_t> tokens = dataset->get(index).tokens;
      stream.insert(stream.end(), tokens.begin(), tokens.end());
    }
  }
  DataLoader loader(dataset, options);
  std::vector<int64_t> packed;
  while (packed.size() + 21 <= stream.size()) {
    for (const auto& row : rows_of(loader.next().input_ids)) {
      packed.insert(packed.end(), row.begin(), row.end());
    }
  }
  CHECK(packed == std::vector<int64_t>(stream.begin(), stream.begin() + packed.size()));
  CHECK(loader.state().epoch == 3);
}

TEST_CASE("answer-only labels ignore prompt tokens, also across a row boundary") {
  LoaderOptions options = in_order(2, 4, /*pack=*/true);
  options.answer_only = true;
  DataLoader packed(three_examples(), options);
  CHECK(rows_of(packed.next()).labels == Rows{{1, 2, 3, kIgnore}, {kIgnore, 6, 7, 8}});

  options.pack = false;
  options.sequence_length = 6;
  DataLoader padded(three_examples(), options);
  CHECK(rows_of(padded.next()).labels ==
        Rows{{1, 2, 3, kIgnore, kIgnore, kIgnore}, {kIgnore, kIgnore, 6, 7, 8, kIgnore}});
}

TEST_CASE("without packing each row is one example, padded or truncated") {
  DataLoader loader(three_examples(), in_order(3, 4, /*pack=*/false));
  BatchRows batch = rows_of(loader.next());
  CHECK(batch.input_ids == Rows{{1, 2, 3, kPad}, {4, 5, 6, 7}, {9, 10, kPad, kPad}});
  CHECK(batch.labels == Rows{{1, 2, 3, kIgnore}, {4, 5, 6, 7}, {9, 10, kIgnore, kIgnore}});
  CHECK(batch.attention_mask == Rows{{1, 1, 1, 0}, {1, 1, 1, 1}, {1, 1, 0, 0}});
  CHECK(batch.position_ids == Rows{{0, 1, 2, 3}, {0, 1, 2, 3}, {0, 1, 2, 3}});
  CHECK(loader.state().epoch == 1);
  CHECK(loader.state().position == 0);
}

TEST_CASE("a custom pad token fills the padding") {
  LoaderOptions options = in_order(1, 4, /*pack=*/false);
  options.pad_token = 0;
  DataLoader loader(three_examples(), options);
  CHECK(rows_of(loader.next()).input_ids == Rows{{1, 2, 3, 0}});
}

TEST_CASE("epoch orders are seeded permutations that change every epoch") {
  using ferry::data::epoch_order;
  std::vector<int64_t> identity(50);
  for (int64_t i = 0; i < 50; ++i) {
    identity[i] = i;
  }
  CHECK(epoch_order(50, 7, 3, /*shuffle=*/false) == identity);
  std::vector<int64_t> epoch0 = epoch_order(50, 7, 0, true);
  std::vector<int64_t> epoch1 = epoch_order(50, 7, 1, true);
  CHECK(epoch0 == epoch_order(50, 7, 0, true));
  CHECK(epoch0 != epoch1);
  CHECK(epoch0 != epoch_order(50, 8, 0, true));
  CHECK(epoch0 != identity);
  std::sort(epoch0.begin(), epoch0.end());
  std::sort(epoch1.begin(), epoch1.end());
  CHECK(epoch0 == identity);
  CHECK(epoch1 == identity);
  // Pinned: these orders are part of what a saved resume position means, on every platform.
  CHECK(epoch_order(8, 42, 0, true) == std::vector<int64_t>{4, 3, 2, 1, 0, 5, 7, 6});
}

TEST_CASE("shuffled loaders with one seed give the same batches") {
  auto dataset = ferry::data::addition_dataset({2, 5}, ferry::data::Split::kTrain, 40);
  LoaderOptions options;
  options.batch_size = 4;
  options.sequence_length = 16;
  options.seed = 11;
  DataLoader a(dataset, options);
  DataLoader b(dataset, options);
  options.seed = 12;
  DataLoader other_seed(dataset, options);
  std::vector<BatchRows> from_a = next_batches(a, 12);
  CHECK(from_a == next_batches(b, 12));
  CHECK(!(from_a == next_batches(other_seed, 12)));
}

TEST_CASE("restoring a saved state continues exactly where the loader was") {
  bool pack = GENERATE(true, false);
  bool answer_only = GENERATE(true, false);
  auto dataset = ferry::data::addition_dataset({3, 1}, ferry::data::Split::kTrain, 23);
  LoaderOptions options;
  options.batch_size = 3;
  options.sequence_length = 11;
  options.pack = pack;
  options.answer_only = answer_only;
  options.seed = 99;
  DataLoader uninterrupted(dataset, options);
  next_batches(uninterrupted, 7);
  std::string saved = uninterrupted.state().to_json();

  DataLoader resumed(dataset, options);
  resumed.restore(LoaderState::from_json(saved));
  // Twenty batches of three rows pass several epoch boundaries of 23 examples.
  CHECK(next_batches(resumed, 20) == next_batches(uninterrupted, 20));
}

TEST_CASE("the example stream does not depend on the batch size") {
  auto dataset = ferry::data::addition_dataset({2, 3}, ferry::data::Split::kTrain, 10);
  LoaderOptions options;
  options.sequence_length = 8;
  options.batch_size = 2;
  DataLoader pairs(dataset, options);
  options.batch_size = 3;
  DataLoader triples(dataset, options);
  Rows from_pairs;
  Rows from_triples;
  for (int i = 0; i < 3; ++i) {
    Rows rows = rows_of(pairs.next().input_ids);
    from_pairs.insert(from_pairs.end(), rows.begin(), rows.end());
  }
  for (int i = 0; i < 2; ++i) {
    Rows rows = rows_of(triples.next().input_ids);
    from_triples.insert(from_triples.end(), rows.begin(), rows.end());
  }
  CHECK(from_pairs == from_triples);
  CHECK(pairs.state().to_json() == triples.state().to_json());
}

TEST_CASE("a padding loader restored mid-example continues with the rest of it") {
  DataLoader packing(three_examples(), in_order(1, 4, /*pack=*/true));
  packing.next();
  DataLoader padding(three_examples(), in_order(1, 6, /*pack=*/false));
  padding.restore(packing.state());
  CHECK(rows_of(padding.next().input_ids) == Rows{{5, 6, 7, 8, kPad, kPad}});
  CHECK(rows_of(padding.next().input_ids) == Rows{{9, 10, kPad, kPad, kPad, kPad}});
}

TEST_CASE("a state that does not fit the loader is refused and changes nothing") {
  DataLoader loader(three_examples(), in_order(1, 4, /*pack=*/true));
  loader.next();
  LoaderState state = loader.state();
  CHECK(state.position == 1);
  CHECK(state.token_offset == 1);

  LoaderState other_seed = state;
  other_seed.seed = 5;
  CHECK_THROWS_WITH(loader.restore(other_seed), Contains("seed 5"));
  LoaderState other_size = state;
  other_size.dataset_size = 4;
  CHECK_THROWS_WITH(loader.restore(other_size), Contains("4 examples") && Contains("three"));
  LoaderState past_end = state;
  past_end.position = 3;
  CHECK_THROWS_WITH(loader.restore(past_end), Contains("position 3") && Contains("0 to 2"));
  LoaderState past_example = state;
  past_example.token_offset = 5;
  CHECK_THROWS_WITH(loader.restore(past_example),
                    Contains("token_offset 5") && Contains("has 5 tokens"));
  CHECK(loader.state().to_json() == state.to_json());
  CHECK(rows_of(loader.next().input_ids) == Rows{{5, 6, 7, 8}});

  CHECK_THROWS_WITH(LoaderState::from_json("{\"epoch\": 1}"), Contains("\"seed\""));
  CHECK_THROWS_WITH(LoaderState::from_json("not json"), Contains("not json"));
  std::string without_position = state.to_json();
  without_position.replace(without_position.find("\"position\""), 10, "\"place\"");
  CHECK_THROWS_WITH(LoaderState::from_json(without_position), Contains("\"position\""));
}

TEST_CASE("token ids at or above vocab_size are refused with their place") {
  LoaderOptions options = in_order(1, 4, /*pack=*/true);
  options.vocab_size = 9;
  options.pad_token = 0;
  DataLoader loader(three_examples(), options);
  CHECK(rows_of(loader.next().input_ids) == Rows{{1, 2, 3, 4}});
  CHECK(rows_of(loader.next().input_ids) == Rows{{5, 6, 7, 8}});
  CHECK_THROWS_WITH(loader.next(), Contains("token id 9 at position 0 of example 2 of three") &&
                                       Contains("0 to 8"));
  CHECK_THROWS_WITH(ferry::data::make_dataset("negative", {Example{{1, -3}, 0, {}}}),
                    Contains("token id -3 at position 1 of example 0 of negative") && Contains("0 and above"));
}

TEST_CASE("bad loader options name the option") {
  auto dataset = three_examples();
  LoaderOptions options = in_order(0, 4, true);
  CHECK_THROWS_WITH(DataLoader(dataset, options), Contains("batch_size is 0"));
  options = in_order(1, 1, true);
  CHECK_THROWS_WITH(DataLoader(dataset, options), Contains("sequence_length is 1"));
  options = in_order(1, 4, true);
  options.vocab_size = 100;
  options.pad_token = 100;
  CHECK_THROWS_WITH(DataLoader(dataset, options), Contains("pad_token is 100"));
  CHECK_THROWS_WITH(DataLoader(ferry::data::make_dataset("nothing", {}), in_order(1, 4, true)),
                    Contains("nothing has no examples"));
}
