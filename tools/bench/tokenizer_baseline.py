#!/usr/bin/env python3
"""Hugging Face `tokenizers` as the baseline of `ferry bench tokenizer` (docs/tokenizer.md).

  tokenizer_baseline.py run --tokenizer PATH --data FILE --threads N [--repeat R]
      encodes every non-empty line of FILE with encode_batch_fast(lines, add_special_tokens=False)
      on N threads (RAYON_NUM_THREADS) and prints one JSON line: the best of R runs' seconds, the
      bytes and tokens, and sums over the ids that `ferry bench tokenizer` compares with its own.
  tokenizer_baseline.py corpus --out FILE [--megabytes 64]
      writes a text corpus made of this Python's own source and documentation files (English and
      code), for machines that cannot download one.
  tokenizer_baseline.py train --data FILE --out DIR [--vocab 32000] [--kind llama3|qwen2|gpt2]
      trains a tokenizer of that family's shape on FILE and saves DIR/tokenizer.json.

`ferry bench tokenizer` runs `run` itself, once with one thread and once with all, on the same
file and tokenizer it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import List

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def documents(path: Path) -> List[str]:
    # newline="": "\r\n" stays as it is in the file, as ferry reads it.
    with open(path, encoding="utf-8", newline="") as file:
        return [line for line in file.read().split("\n") if line]


def run(args: argparse.Namespace) -> None:
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if args.threads > 1 else "false"
    import tokenizers

    path = Path(args.tokenizer)
    if path.is_dir():
        path = path / "tokenizer.json"
    tokenizer = tokenizers.Tokenizer.from_file(str(path))
    lines = documents(Path(args.data))
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    best = float("inf")
    encodings = None
    for _ in range(args.repeat):
        start = time.perf_counter()
        encodings = encode(lines, add_special_tokens=False)
        best = min(best, time.perf_counter() - start)
    tokens = id_sum = weighted = 0
    for encoding in encodings:
        ids = encoding.ids
        tokens += len(ids)
        id_sum += sum(ids)
        weighted += sum((position + 1) * id_ for position, id_ in enumerate(ids))
    print(json.dumps({"library": f"tokenizers {tokenizers.__version__}", "threads": args.threads, "seconds": best,
                      "bytes": sum(len(line.encode("utf-8")) for line in lines), "documents": len(lines),
                      "tokens": tokens, "id_sum": id_sum, "weighted_id_sum": weighted}))


def corpus(args: argparse.Namespace) -> None:
    wanted = args.megabytes << 20
    roots = {Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])}
    written = 0
    with open(args.out, "w", encoding="utf-8") as out:
        for root in sorted(roots):
            for path in sorted(root.rglob("*")):
                if written >= wanted:
                    break
                if path.suffix not in (".py", ".md", ".rst", ".txt") or not path.is_file():
                    continue
                try:
                    text = path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                out.write(text)
                if not text.endswith("\n"):
                    out.write("\n")
                written += len(text.encode("utf-8"))
    print(json.dumps({"corpus": args.out, "bytes": written}))


def train(args: argparse.Namespace) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=args.kind == "gpt2")
    if args.kind == "gpt2":
        tokenizer.pre_tokenizer = byte_level
    else:
        pattern = LLAMA3_PATTERN if args.kind == "llama3" else QWEN2_PATTERN
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level])
    if args.kind == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, min_frequency=2, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train([args.data], trainer)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(Path(args.out) / "tokenizer.json"))
    print(json.dumps({"tokenizer": str(Path(args.out) / "tokenizer.json"), "vocab": tokenizer.get_vocab_size()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--tokenizer", required=True)
    run_parser.add_argument("--data", required=True)
    run_parser.add_argument("--threads", type=int, default=1)
    run_parser.add_argument("--repeat", type=int, default=3)
    corpus_parser = sub.add_parser("corpus")
    corpus_parser.add_argument("--out", required=True)
    corpus_parser.add_argument("--megabytes", type=int, default=64)
    train_parser = sub.add_parser("train")
    train_parser.add_argument("--data", required=True)
    train_parser.add_argument("--out", required=True)
    train_parser.add_argument("--vocab", type=int, default=32000)
    train_parser.add_argument("--kind", choices=("llama3", "qwen2", "gpt2"), default="llama3")
    args = parser.parse_args()
    {"run": run, "corpus": corpus, "train": train}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
