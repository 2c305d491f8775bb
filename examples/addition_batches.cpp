// The data side of ferry's default job: the addition task as answer-only batches, decoded,
// and a loader position saved and restored.
//
//   ./build/examples/example_addition_batches

#include <ferry/data.h>

#include <iostream>

namespace {

void print_row(const ferry::data::Batch& batch, int64_t row) {
  ferry::data::ByteTokenizer tokenizer;
  std::vector<int64_t> tokens;
  std::vector<int64_t> learned;
  for (int64_t column = 0; column < batch.input_ids.size(1); ++column) {
    int64_t token = batch.input_ids[row][column].item<int64_t>();
    int64_t label = batch.labels[row][column].item<int64_t>();
    tokens.push_back(token);
    if (label != ferry::data::kIgnoreIndex) {
      learned.push_back(label);
    }
  }
  std::cout << "  input \"" << tokenizer.decode(tokens) << "\"  learns \""
            << tokenizer.decode(learned) << "\" + EOS\n";
}

}  // namespace

int main() {
  ferry::data::AdditionTask task;  // two-digit numbers, seed 0
  auto train = ferry::data::addition_dataset(task, ferry::data::Split::kTrain, 2000);

  ferry::data::LoaderOptions options;
  options.batch_size = 4;
  options.sequence_length = 16;
  options.pack = false;  // one problem per row
  options.answer_only = true;
  options.vocab_size = ferry::data::ByteTokenizer::kVocabSize;
  ferry::data::DataLoader loader(train, options);

  ferry::data::Batch first = loader.next();
  std::cout << "first batch of " << train->name() << ":\n";
  for (int64_t row = 0; row < options.batch_size; ++row) {
    print_row(first, row);
  }

  std::string saved = loader.state().to_json();
  ferry::data::Batch expected = loader.next();
  ferry::data::DataLoader resumed(train, options);
  resumed.restore(ferry::data::LoaderState::from_json(saved));
  bool same = resumed.next().input_ids.equal(expected.input_ids);
  std::cout << "saved position " << saved << "\nresumed batch is the same: " << std::boolalpha
            << same << "\n";
  return same ? 0 : 1;
}
