"""Fine-tune a preset or a Hugging Face checkpoint in zero-offload mode from Python.

    /usr/bin/python3 examples/python/finetune.py                      # tiny-llama, addition demo
    /usr/bin/python3 examples/python/finetune.py --model /data/Qwen2-0.5B --data train.jsonl \
        --precision bf16 --steps 1000 --batch 8 --seq 512 --lr 2e-5 --out runs/qwen

Without --data it trains on ferry's built-in addition task and prints the exact-match accuracy
before and after, as `ferry finetune` does. Run from the source tree after building the
extension (docs/python.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

import ferry  # noqa: E402


def exact_match(engine: ferry.Engine, problems: list) -> float:
    tokenizer = ferry.data.ByteTokenizer()
    correct = 0
    for prompt, completion in problems:
        ids = [tokenizer.BOS, *tokenizer.encode(prompt)]
        answer = engine.generate(ids, len(completion) + 1, stop_token=tokenizer.EOS)
        correct += answer == tokenizer.encode(completion)
    return correct / len(problems)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", help="preset name or HF directory")
    parser.add_argument("--data", default=None, help=".jsonl, text or .bin; default: the demo")
    parser.add_argument("--mode", default="zero-offload")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default="runs/python-demo")
    args = parser.parse_args()

    engine = ferry.Engine(args.model, mode=args.mode, precision=args.precision, lr=args.lr,
                          weight_decay=0.01, schedule="cosine", warmup=20, steps=args.steps,
                          min_lr_ratio=0.1, max_grad_norm=1.0, seed=1)
    print(engine, file=sys.stderr)
    demo = args.data is None
    if demo:
        dataset = ferry.data.addition_dataset(max_digits=1, seed=1, split="train", count=20000)
        problems = ferry.data.addition_problems(max_digits=1, seed=1, split="eval", count=100)
        print(f"exact-match accuracy before: {exact_match(engine, problems):.0%}", file=sys.stderr)
    else:
        dataset = ferry.data.open_dataset(args.data, args.seq)
    loader = ferry.data.DataLoader(dataset, args.batch, args.seq, pack=not demo,
                                   answer_only=demo, seed=1)

    start = time.monotonic()
    for batch in loader:
        result = engine.train_step(batch)
        if result is None:
            continue
        if result.step % 20 == 0 or result.step == args.steps:
            print(f"step {result.step}  loss {result.loss:.4f}  lr {result.lr:.2e}  "
                  f"{time.monotonic() - start:.0f} s", file=sys.stderr)
        if result.step == args.steps:
            break

    engine.save(Path(args.out) / "final", extra={"loader": loader.state()})
    if demo:
        print(f"exact-match accuracy after: {exact_match(engine, problems):.0%}", file=sys.stderr)
    stats = engine.stats()
    print(f"forward {stats['forward_seconds']:.1f} s, backward {stats['backward_seconds']:.1f} s, "
          f"optimizer {stats['optimizer_seconds']:.1f} s; checkpoint in {args.out}/final",
          file=sys.stderr)


if __name__ == "__main__":
    main()
