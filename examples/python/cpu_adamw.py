"""ferry.optim.CPUAdamW as a drop-in for torch.optim.AdamW in an ordinary PyTorch loop.

    /usr/bin/python3 examples/python/cpu_adamw.py

Trains the same small MLP twice from the same start, once with each optimizer, and prints the
losses side by side and the time each optimizer's step() took. Both then hold the same state:
ferry's state_dict loads into torch's AdamW.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

import ferry  # noqa: E402


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> tuple:
    generator = torch.Generator().manual_seed(0)
    losses, optimizer_seconds = [], 0.0
    for _ in range(steps):
        x = torch.randn(64, 512, generator=generator)
        loss = (model(x) - x.flip(-1)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        start = time.perf_counter()
        optimizer.step()
        optimizer_seconds += time.perf_counter() - start
        losses.append(loss.item())
    return losses, optimizer_seconds


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(),
                                torch.nn.Linear(2048, 512))
    reference = copy.deepcopy(model)

    ours = ferry.optim.CPUAdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    theirs = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.01)
    ferry_losses, ferry_seconds = train(model, ours, 30)
    torch_losses, torch_seconds = train(reference, theirs, 30)

    for step in range(0, 30, 5):
        print(f"step {step:2d}  ferry {ferry_losses[step]:.6f}  torch {torch_losses[step]:.6f}")
    print(f"optimizer time: ferry {ferry_seconds * 1e3:.0f} ms, torch {torch_seconds * 1e3:.0f} ms "
          f"(ISA {ferry._C.optim.active_isa()})")
    theirs.load_state_dict(ours.state_dict())  # the state is torch's own format
    print("ferry's state_dict loaded into torch.optim.AdamW")


if __name__ == "__main__":
    main()
