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
