"""ferry.data: the tokenizer, datasets, the loader's exact resume, and the error types."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

import ferry


def test_byte_tokenizer_round_trips_text() -> None:
    tokenizer = ferry.data.ByteTokenizer()
    ids = tokenizer.encode("7+8=")
    assert ids == [ord(c) for c in "7+8="]
    bos, eos = ferry.data.ByteTokenizer.BOS, ferry.data.ByteTokenizer.EOS
    assert tokenizer.decode([bos, *ids, eos]) == "7+8="
    assert ferry.data.ByteTokenizer.VOCAB_SIZE == 259
    with pytest.raises(ferry.Error):
        tokenizer.decode([1000])


def test_addition_problems_and_dataset() -> None:
    train = ferry.data.addition_problems(max_digits=2, seed=1, split="train", count=5)
    assert len(train) == 5 and all(p.endswith("=") and c.isdigit() for p, c in train)
    assert train == ferry.data.addition_problems(2, 1, "train", 5)
    dataset = ferry.data.addition_dataset(2, 1, "train", 5)
    tokens, prompt_tokens = dataset[0]
    assert len(dataset) == 5 and prompt_tokens == 1 + len(train[0][0])
    assert tokens[0] == ferry.data.ByteTokenizer.BOS
    with pytest.raises(IndexError):
        dataset[5]
    with pytest.raises(ferry.Error, match="split 'test' is not valid"):
        ferry.data.addition_problems(2, 1, "test", 5)


def test_loader_batches_and_exact_resume() -> None:
    dataset = ferry.data.addition_dataset(2, 1, "train", 50)
    loader = ferry.data.DataLoader(dataset, batch_size=3, sequence_length=10, pack=False,
                                   answer_only=True, seed=4)
    batch = next(loader)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "position_ids"}
    assert batch["input_ids"].shape == (3, 10) and batch["input_ids"].dtype == torch.int64
    assert (batch["labels"][:, :3] == -100).all()  # BOS and the first prompt tokens
    state = loader.state()
    expected = [next(loader) for _ in range(3)]
    resumed = ferry.data.DataLoader(dataset, 3, 10, pack=False, answer_only=True, seed=4)
    resumed.restore(state)
    for want in expected:
        got = next(resumed)
        assert all(torch.equal(want[key], got[key]) for key in want)


def test_open_dataset_reads_jsonl_and_reports_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "hello"}\n{"prompt": "2+2=", "completion": "4"}\n')
    dataset = ferry.data.open_dataset(path, example_tokens=64)
    assert len(dataset) == 2 and dataset.name == str(path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "hello"}\n')
    with pytest.raises(ferry.Error, match="bad.jsonl"):
        ferry.data.open_dataset(bad, 64)


def test_io_errors_are_oserrors_with_errno_and_path(tmp_path: Path) -> None:
    # A token file that cannot be opened surfaces as ferry.IoError, or as ferry.Error when
    # the data layer reports it before any I/O: either way a ferry.Error naming the path.
    missing = tmp_path / "missing.bin"
    with pytest.raises(ferry.Error, match="missing.bin") as caught:
        ferry.data.open_dataset(missing, 16)
    if isinstance(caught.value, ferry.IoError):
        assert caught.value.errno == errno.ENOENT and caught.value.path == str(missing)
    assert issubclass(ferry.IoError, OSError) and issubclass(ferry.IoError, ferry.Error)
    assert issubclass(ferry.BudgetExceeded, MemoryError)


# --- make_dataset: your own token ids ----------------------------------------------------------


def test_make_dataset_holds_the_examples_with_their_prompts() -> None:
    examples = [[5, 6, 7, 8], torch.tensor([9, 10, 11]), (12, 13)]
    dataset = ferry.data.make_dataset(examples, [2, 1, 0], vocab_size=20, name="mine")
    assert len(dataset) == 3 and dataset.name == "mine"
    assert dataset[0] == ([5, 6, 7, 8], 2)
    assert dataset[1] == ([9, 10, 11], 1)
    assert dataset.learned(0) == [False, False, True, True]
    assert dataset.summary(3) == {"examples": 3, "tokens": 9, "longest": 4, "longer_than": 1,
                                  "learned_tokens": 6}
    without_prompts = ferry.data.make_dataset(torch.arange(6).view(2, 3))  # the rows of a tensor
    assert [without_prompts[i] for i in range(2)] == [([0, 1, 2], 0), ([3, 4, 5], 0)]


def test_make_dataset_batches_as_the_loader_packs_and_pads_them() -> None:
    """The loader treats these examples as the C++ data layer's own (docs/data.md): padded rows
    mask the prompt and the padding, packed rows restart positions at each example."""
    dataset = ferry.data.make_dataset([[1, 2, 3, 4], [5, 6, 7]], prompt_lengths=[2, 1], vocab_size=10)
    padded = next(ferry.data.DataLoader(dataset, 2, 5, pack=False, answer_only=True, shuffle=False,
                                        vocab_size=10, pad_token=0))
    assert padded["input_ids"].tolist() == [[1, 2, 3, 4, 0], [5, 6, 7, 0, 0]]
    assert padded["labels"].tolist() == [[-100, -100, 3, 4, -100], [-100, 6, 7, -100, -100]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    packed = next(ferry.data.DataLoader(dataset, 1, 7, pack=True, shuffle=False))
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert packed["labels"].tolist() == [[1, 2, 3, 4, 5, 6, 7]]  # not answer-only: every token
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]


def test_make_dataset_names_the_bad_example_its_value_and_the_valid_ids() -> None:
    with pytest.raises(ferry.Error, match=r"token id 300 at position 1 of example 2 of the examples "
                                          r"is out of range: valid ids are 0 to 258 \(vocab_size 259\)"):
        ferry.data.make_dataset([[1], [2, 3], [4, 300]], vocab_size=259)
    with pytest.raises(ferry.Error, match=r"token id -1 at position 0 of example 0 .* 0 and above"):
        ferry.data.make_dataset([[-1, 2]])
    with pytest.raises(ferry.Error, match="example 1 of the examples has no tokens"):
        ferry.data.make_dataset([[1], []])
    with pytest.raises(ferry.Error, match="example 0 of the examples has prompt_tokens 3: valid are 0 to its 2"):
        ferry.data.make_dataset([[1, 2]], [3])
    with pytest.raises(ValueError, match="prompt_lengths has 1 entries for 2 examples"):
        ferry.data.make_dataset([[1], [2]], [0])
    with pytest.raises(TypeError, match=r"examples\[1\]\[2\] is 2.5 \(float\): ids are ints"):
        ferry.data.make_dataset([[1], [1, 2, 2.5]])
    with pytest.raises(TypeError, match=r"examples\[0\] is 'hello' \(str\).*tokenize it first"):
        ferry.data.make_dataset(["hello"])
    with pytest.raises(TypeError, match=r"examples\[0\] is a tensor of torch.float32"):
        ferry.data.make_dataset([torch.ones(3)])
    with pytest.raises(ValueError, match=r"examples\[0\] has shape \[\]"):
        ferry.data.make_dataset(torch.tensor([1, 2, 3]))  # one sequence, not a list of them
    with pytest.raises(TypeError, match=r"prompt_lengths\[0\] is True \(bool\)"):
        ferry.data.make_dataset([[1, 2]], [True])
    with pytest.raises(ferry.Error, match="vocab_size = 0 is not valid"):
        ferry.data.make_dataset([[1]], vocab_size=0)


def test_make_dataset_learns_where_hugging_face_labels_say() -> None:
    """labels (aligned, -100 where not learned) become per-token learned flags, which the loader
    turns back into the same labels with answer_only=True."""
    tokens = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    labels = [[-100, -100, 3, 4, -100, 6], torch.tensor([-100, 8, 9])]
    dataset = ferry.data.make_dataset(tokens, labels=labels, vocab_size=10)
    assert dataset.learned(0) == [False, False, True, True, False, True]
    batch = next(ferry.data.DataLoader(dataset, 2, 6, pack=False, answer_only=True, shuffle=False,
                                       vocab_size=10, pad_token=0))
    assert batch["labels"].tolist() == [[-100, -100, 3, 4, -100, 6], [-100, 8, 9, -100, -100, -100]]
    with pytest.raises(ValueError, match=r"labels\[1\]\[1\] is 9 but examples\[1\]\[1\] is 8: labels are "
                                         r"aligned with the tokens, not shifted"):
        ferry.data.make_dataset(tokens, labels=[labels[0], [-100, 9, -100]])  # shifted by one
    with pytest.raises(ValueError, match=r"labels\[0\] has 2 labels for the 6 tokens of examples\[0\]"):
        ferry.data.make_dataset(tokens, labels=[[1, 2], [7, 8, 9]])
    with pytest.raises(ValueError, match="labels has 1 sequences for 2 examples"):
        ferry.data.make_dataset(tokens, labels=labels[:1])
    with pytest.raises(TypeError, match="prompt_lengths or labels, not both"):
        ferry.data.make_dataset(tokens, [0, 0], labels=labels)
