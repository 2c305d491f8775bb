"""ferry.Engine under torchrun's variables: two real processes joined over c10d Gloo on loopback
train as one process on the global batch (docs/distributed.md)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Dict, List

import pytest
from conftest import SOURCE_ROOT

STEPS = 4
GLOBAL_ROWS = 4

# One rank: its rows of each global batch of random tokens (every label learned, no padding).
WORKER = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import ferry
engine = ferry.Engine("tiny-llama", device="cpu", mode="zero-offload", lr=3e-3, seed=7)
b = {rows} // engine.world_size
losses = []
for step in range({steps}):
    tokens = torch.randint(0, 512, ({rows}, 16), generator=torch.Generator().manual_seed(step))
    rows = tokens[engine.rank * b:(engine.rank + 1) * b]
    losses.append(engine.train_step({{"input_ids": rows, "labels": rows.clone()}}).loss)
print(json.dumps({{"rank": engine.rank, "world_size": engine.world_size, "losses": losses,
                  "weights": [float(p.double().sum()) for p in engine.parameters()]}}))
""".format(rows=GLOBAL_ROWS, steps=STEPS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world_size: int) -> List[Dict]:
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        processes.append(subprocess.Popen([sys.executable, "-c", WORKER, str(SOURCE_ROOT / "python")],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_two_processes_under_torchrun_variables_train_as_one() -> None:
    ranks = run_world(2)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    alone = run_world(1)[0]
    assert alone["world_size"] == 1
    assert ranks[0]["losses"] == pytest.approx(alone["losses"], rel=1e-5)
    assert ranks[0]["weights"] == pytest.approx(alone["weights"], rel=1e-4, abs=1e-4)
