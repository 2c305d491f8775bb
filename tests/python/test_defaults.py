"""One set of defaults for real jobs: `ferry finetune`'s flags, its job file and the Python Engine
resolve the same job to the same engine settings (docs/launcher.md, "Defaults")."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Dict

import ferry
from ferry.engine import engine_settings


def printed_config(build_dir: Path, *args: str) -> Dict[str, Any]:
    run = subprocess.run([str(build_dir / "ferry"), "finetune", *args, "--print-config"], capture_output=True,
                         text=True, check=True)
    return json.loads(run.stdout)


def test_flags_job_file_and_python_resolve_the_same_defaults(tmp_path: Path, build_dir: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    job = {"model": "tiny-gpt2", "data": str(tmp_path / "train.jsonl"), "steps": 200, "lora_rank": 4}
    from_flags = printed_config(build_dir, "--model", "tiny-gpt2", "--data", job["data"], "--steps", "200",
                                "--lora-rank", "4")
    (tmp_path / "job.json").write_text(json.dumps(job))
    from_file = printed_config(build_dir, "--config", str(tmp_path / "job.json"))
    assert from_flags == from_file

    engine = ferry.Engine("tiny-gpt2", steps=200, lora_rank=4)
    python = engine.settings
    compared = [key for key in engine_settings() if key in from_flags and from_flags[key] != "auto"]
    assert {"lr", "schedule", "warmup", "max_grad_norm", "weight_decay", "optimizer", "mode"} <= set(compared)
    for key in compared:
        assert python[key] == from_flags[key], key
    # The real-job defaults themselves, as documented.
    assert from_flags["lr"] == 2e-4 and from_flags["schedule"] == "cosine" and from_flags["warmup"] == 6
    assert from_flags["max_grad_norm"] == 1.0 and from_flags["batch"] == 8 and from_flags["seq"] == 1024
    assert engine.precision == ("bf16" if engine.device.type == "cuda" else "fp32")


def test_python_without_steps_holds_the_lr_after_warm_up() -> None:
    settings = ferry.Engine("tiny-gpt2", device="cpu").settings
    assert settings["schedule"] == "constant" and settings["warmup"] == 0 and "steps" not in settings
    assert settings["lr"] == 5e-5 and settings["max_grad_norm"] == 1.0


def test_the_demo_keeps_its_own_settings(build_dir: Path) -> None:
    demo = printed_config(build_dir)
    assert demo["data"] == "demo" and demo["lr"] == 3e-3 and demo["steps"] == 400 and demo["precision"] == "fp32"
    assert printed_config(build_dir, "--batch", "4")["lr"] == 3e-3
    assert printed_config(build_dir, "--model", "tiny-gpt2")["lr"] == 5e-5
