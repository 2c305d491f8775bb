"""Zeroth-order fine-tuning (zo2 mode: MeZO with block weights streamed from host memory or NVMe)
of an OPT checkpoint from Python.

    /usr/bin/python3 examples/python/zo2_opt.py                        # tiny-opt, random weights
    python3 examples/python/zo2_opt.py --model /data/opt-1.3b --precision bf16 --lr 1e-7 \
        --zo-blocks nvme --nvme /mnt/nvme0 --data train.jsonl --seq 256 --steps 2000

Forward passes only: no gradients and no optimizer states beyond SGD's, so the GPU holds the
embeddings, the head and a window of blocks. Without --data it trains on ferry's addition task
and prints the held-out loss before and after (docs/zo2.md, docs/python.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

import ferry  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-opt", help="preset name or OPT HF directory")
    parser.add_argument("--data", default=None, help=".jsonl, text or .bin; default: the demo")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--zo-eps", type=float, default=1e-3)
    parser.add_argument("--zo-blocks", default="host", help="gpu, host or nvme")
    parser.add_argument("--nvme", default="", help="directories for --zo-blocks nvme")
    args = parser.parse_args()

    engine = ferry.Engine(args.model, mode="zo2", precision=args.precision, optimizer="sgd",
                          lr=args.lr, zo_eps=args.zo_eps, zo_blocks=args.zo_blocks,
                          nvme=args.nvme, seed=1)
    print(engine, file=sys.stderr)
    if args.data is None:
        dataset = ferry.data.addition_dataset(max_digits=1, seed=1, split="train", count=20000)
        held_out_set = ferry.data.addition_dataset(max_digits=1, seed=1, split="eval", count=200)
    else:
        dataset = held_out_set = ferry.data.open_dataset(args.data, args.seq)
    options = dict(pack=args.data is not None, answer_only=args.data is None, seed=1)
    loader = ferry.data.DataLoader(dataset, args.batch, args.seq, **options)
    held_out = next(ferry.data.DataLoader(held_out_set, 64, args.seq, **options))
    print(f"held-out loss before: {engine.evaluate(held_out):.4f}", file=sys.stderr)

    start = time.monotonic()
    for step in range(1, args.steps + 1):
        result = engine.train_step(next(loader))
        if step % 50 == 0:
            print(f"step {step}  loss {result.loss:.4f}  projected gradient "
                  f"{result.projected_grads[0]:+.3f}  {time.monotonic() - start:.0f} s",
                  file=sys.stderr)
    engine.flush()  # the last step's update is applied when the blocks next come up
    print(f"held-out loss after {args.steps} steps: {engine.evaluate(held_out):.4f}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
