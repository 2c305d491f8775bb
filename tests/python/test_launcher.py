"""`ferry finetune` as a launcher: YAML job files, the checks before any long work, SIGTERM and
`--resume auto`, and the final Hugging Face export."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch

import ferry

TINY_JOB = """\
# A job file in YAML: comments, nested lists, engine settings without flags (beta2).
model: tiny-llama
mode: zero-offload
steps: {steps}
batch: 8
seq: 16
lr: 3e-3
beta2: 0.98          # an engine setting that has no flag
schedule: cosine
warmup: 2
eval_problems: 1
log_every: 1
precision: {precision}
export: {export}
out: {out}
"""


def run_ferry(build_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(build_dir / "ferry"), "finetune", *args], capture_output=True, text=True,
                          check=check)


def losses(out: Path) -> Dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def safetensors_dtypes(path: Path) -> List[str]:
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    return sorted({info["dtype"] for name, info in header.items() if name != "__metadata__"})


def write_job(tmp_path: Path, steps: int = 4, precision: str = "fp32", export: str = "auto") -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(TINY_JOB.format(steps=steps, precision=precision, export=export, out=tmp_path / "run"))
    return job


def test_a_yaml_job_trains_checkpoints_and_exports_for_hugging_face(tmp_path: Path, build_dir: Path) -> None:
    run = run_ferry(build_dir, "--config", str(write_job(tmp_path, precision="bf16")), "--device", "cpu")
    out = tmp_path / "run"
    assert "plan: gpu" in run.stderr and "predicted" in run.stderr
    assert "measured / predicted" in run.stderr
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["beta2"] == 0.98 and resolved["lr"] == 3e-3 and resolved["steps"] == 4
    assert sorted(losses(out)) == [1, 2, 3, 4]

    export = out / "hf"
    assert f"exported the model (bf16, Hugging Face safetensors): {export}" in run.stderr
    assert json.loads((export / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert safetensors_dtypes(export / "model.safetensors") == ["BF16"]
    assert not (export / "optimizer.safetensors").exists()
    # The export holds the final checkpoint's weights, rounded to bf16.
    exported = ferry.Engine(str(export), precision="fp32", device="cpu")
    final = ferry.Engine(str(out / "checkpoints" / "step-000004"), precision="fp32", device="cpu")
    for mine, reference in zip(exported.parameters(), final.parameters()):
        assert torch.equal(mine, reference.to(torch.bfloat16).float())


def test_sigterm_saves_a_checkpoint_and_resume_auto_gives_the_same_losses(tmp_path: Path,
                                                                          build_dir: Path) -> None:
    steps = 80
    uninterrupted = tmp_path / "uninterrupted"
    uninterrupted.mkdir()
    run_ferry(build_dir, "--config", str(write_job(uninterrupted, steps=steps, export="none")), "--device", "cpu")

    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    job = write_job(interrupted, steps=steps, export="none")
    out = interrupted / "run"
    process = subprocess.Popen([str(build_dir / "ferry"), "finetune", "--config", str(job), "--device", "cpu"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert process.poll() is None and time.monotonic() < deadline, "the job ended before it was signalled"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "checkpoint (interrupted)" in stderr
    stopped_at = max(losses(out))
    assert 5 <= stopped_at < steps, "SIGTERM came after the last step: nothing to resume"
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest.endswith(f"step-{stopped_at:06d}")

    assert latest == f"checkpoints/step-{stopped_at:06d}"  # relative to the run directory

    resumed = run_ferry(build_dir, "--config", str(job), "--device", "cpu", "--resume", "auto")
    assert f"resumed from {out / latest} at step {stopped_at}" in resumed.stderr
    assert losses(out) == losses(uninterrupted / "run")


@pytest.mark.parametrize("flags, message", [
    (["--model", "no-such-model"], "no-such-model"),
    (["--model", "/no/such/dir"], "model directory '/no/such/dir' does not exist"),
    (["--mode", "gpu", "--gpu-budget", "64KiB"], "does not fit its budgets"),
    (["--mode", "fuyou", "--nvme", "/no/such/nvme"], "NVMe directory '/no/such/nvme' does not exist: create it"),
])
def test_bad_jobs_fail_before_any_weights_are_read(flags: List[str], message: str, tmp_path: Path,
                                                    build_dir: Path) -> None:
    run = run_ferry(build_dir, *flags, "--device", "cpu", "--out", str(tmp_path / "run"), check=False)
    assert run.returncode != 0
    assert message in run.stderr
    # Nothing but the run directory's lock, released.
    assert not (tmp_path / "run").exists() or [p.name for p in (tmp_path / "run").iterdir()] == [".ferry.lock"]


def test_an_unwritable_nvme_directory_is_refused(tmp_path: Path, build_dir: Path) -> None:
    if os.geteuid() == 0:
        unwritable = Path("/proc/self")  # root writes through permission bits, but not into procfs
    else:
        unwritable = tmp_path / "read-only"
        unwritable.mkdir(mode=0o555)
    run = run_ferry(build_dir, "--mode", "fuyou", "--nvme", str(unwritable), "--device", "cpu", "--out",
                    str(tmp_path / "run"), check=False)
    assert run.returncode != 0
    assert f"NVMe directory '{unwritable}' is not writable" in run.stderr


def test_an_nvme_directory_too_small_for_the_plan_is_refused(tmp_path: Path, build_dir: Path) -> None:
    # llama-70b's fp32 master and AdamW states (~840 GB) go to NVMe in fuyou mode; the model is
    # never built, since the check comes first.
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    run = run_ferry(build_dir, "--model", "llama-70b", "--mode", "fuyou", "--precision", "bf16", "--nvme",
                    str(nvme), "--fuyou-host-blocks", "0", "--activations", "nvme", "--batch", "1", "--seq", "64",
                    "--device", "cpu", "--hardware", "h100", "--out", str(tmp_path / "run"), check=False)
    assert run.returncode != 0
    # The plan holds NVMe to the directory's free space (--nvme-budget 0), so the job is refused
    # by the plan, as `ferry plan` refuses it, before any weight is read.
    assert "does not fit its budgets" in run.stderr and "nvme tier: needs" in run.stderr


def test_resuming_a_checkpoint_of_another_model_is_refused_up_front(tmp_path: Path, build_dir: Path) -> None:
    other = tmp_path / "other"
    run_ferry(build_dir, "--model", "tiny-gpt2", "--steps", "1", "--batch", "4", "--seq", "16", "--export", "none",
              "--device", "cpu", "--out", str(other))
    run = run_ferry(build_dir, "--model", "tiny-llama", "--resume", str(other / "checkpoints" / "step-000001"),
                    "--device", "cpu", "--out", str(tmp_path / "run"), check=False)
    assert run.returncode != 0
    assert "holds another model (gpt2" in run.stderr and "--resume none" in run.stderr


@pytest.mark.parametrize("text, message", [
    ("model: tiny-llama\nstep: 3\n", "unknown setting 'step'"),
    ("model: [tiny-llama\n", "is not valid YAML: line"),
    ("- a list\n- of steps\n", "must hold a mapping of settings"),
])
def test_bad_job_files_name_the_problem(text: str, message: str, tmp_path: Path, build_dir: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(text)
    run = run_ferry(build_dir, "--config", str(job), check=False)
    assert run.returncode != 0
    assert message in run.stderr


def test_a_staged_fuyou_job_trains_as_one_that_reads_the_checkpoint(tmp_path: Path, build_dir: Path) -> None:
    checkpoint = tmp_path / "hf"
    ferry.Engine("tiny-llama", device="cpu").export_pretrained(checkpoint)
    common = ["--model", str(checkpoint), "--mode", "fuyou", "--fuyou-host-blocks", "0", "--activations", "nvme",
              "--steps", "4", "--batch", "4", "--seq", "16", "--eval-problems", "1", "--export", "none",
              "--device", "cpu"]
    loaded_nvme, staged_nvme = tmp_path / "nvme-loaded", tmp_path / "nvme-staged"
    loaded_nvme.mkdir()
    staged_nvme.mkdir()
    run_ferry(build_dir, *common, "--nvme", str(loaded_nvme), "--out", str(tmp_path / "loaded"))
    staged = run_ferry(build_dir, *common, "--nvme", str(staged_nvme), "--staged", str(staged_nvme), "--out",
                       str(tmp_path / "staged"))
    assert "stage: " in staged.stderr and "bundles written" in staged.stderr
    assert losses(tmp_path / "staged") == losses(tmp_path / "loaded")
    # The layout is now the job's live state: a second job on it is refused with the fix.
    again = run_ferry(build_dir, *common, "--nvme", str(staged_nvme), "--staged", str(staged_nvme), "--out",
                      str(tmp_path / "again"), check=False)
    assert again.returncode != 0 and "ferry stage" in again.stderr


def test_plan_without_a_calibration_file_calibrates_this_machine_and_says_so(tmp_path: Path,
                                                                              build_dir: Path) -> None:
    result = subprocess.run([str(build_dir / "ferry"), "plan", "--model", "tiny-llama", "--mode", "fuyou",
                             "--nvme", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "planning with a quick calibration of this machine" in result.stderr
    assert result.stdout.startswith("plan: tiny-llama (156.5K parameters), fuyou mode")


def test_plan_for_a_gpu_machine_plans_fused_attention(tmp_path: Path, build_dir: Path) -> None:
    result = subprocess.run([str(build_dir / "ferry"), "plan", "--model", "llama-13b", "--mode", "auto",
                             "--hardware", "h100"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "(13.02B parameters)" in result.stdout and "attention fused" in result.stdout, result.stdout


def wait_for_records(process: subprocess.Popen, metrics: Path, count: int) -> None:
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= count):
        assert process.poll() is None and time.monotonic() < deadline, "the job ended too soon"
        time.sleep(0.02)


def test_a_second_job_on_a_run_or_nvme_directory_is_refused_naming_the_first(tmp_path: Path,
                                                                            build_dir: Path) -> None:
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    out = tmp_path / "run"
    common = ["--mode", "fuyou", "--nvme", str(nvme), "--fuyou-host-blocks", "0", "--activations", "nvme",
              "--batch", "4", "--seq", "16", "--eval-problems", "1", "--export", "none", "--device", "cpu",
              "--hardware", "h100", "--log-every", "1"]
    first = subprocess.Popen([str(build_dir / "ferry"), "finetune", *common, "--steps", "100000", "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_records(first, out / "metrics.jsonl", 1)
        same_out = run_ferry(build_dir, "--steps", "2", "--device", "cpu", "--out", str(out), "--resume", "auto",
                             check=False)
        assert same_out.returncode != 0
        assert f"output directory '{out}' is in use by another ferry process (pid {first.pid}" in same_out.stderr
        same_nvme = run_ferry(build_dir, *common, "--steps", "2", "--out", str(tmp_path / "other"), check=False)
        assert same_nvme.returncode != 0
        assert f"NVMe directory '{nvme}' is in use by another ferry process (pid {first.pid}" in same_nvme.stderr
    finally:
        first.kill()
        first.wait()
    # Killed, it left its lock file but no lock: the next job takes it over and says whose it was.
    taken = run_ferry(build_dir, *common, "--steps", "2", "--out", str(tmp_path / "after"))
    assert f"note: {nvme} was locked by pid {first.pid}" in taken.stderr and "taken over" in taken.stderr
    again = run_ferry(build_dir, "--steps", "1", "--eval-problems", "1", "--export", "none", "--device", "cpu",
                      "--out", str(out), "--resume", "auto")
    assert f"was locked by pid {first.pid}" in again.stderr and "taken over" in again.stderr


def test_a_new_job_into_an_earlier_run_is_refused_unless_it_overwrites(tmp_path: Path, build_dir: Path) -> None:
    out = tmp_path / "run"
    flags = ["--steps", "2", "--eval-problems", "1", "--export", "none", "--device", "cpu", "--out", str(out)]
    fresh = run_ferry(build_dir, *flags, "--resume", "auto")
    assert f"resume auto: no checkpoint under {out} yet: starting fresh" in fresh.stderr
    refused = run_ferry(build_dir, *flags, check=False)
    assert refused.returncode != 0
    assert "holds an earlier run" in refused.stderr and "--overwrite" in refused.stderr
    assert sorted(losses(out)) == [1, 2]
    replaced = run_ferry(build_dir, *flags, "--overwrite", "--steps", "3")
    assert "is replaced" in replaced.stderr
    assert sorted(losses(out)) == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000003"]
    # The final checkpoint is written once, also when the last step saved already.
    every = run_ferry(build_dir, *flags, "--overwrite", "--save-every", "1", "--keep-checkpoints", "2")
    assert every.stderr.count("checkpoint (") == 2 and "checkpoint (final)" not in every.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000001", "step-000002"]


def test_kill_9_mid_run_then_resume_auto_gives_the_bits_of_an_uninterrupted_run(tmp_path: Path,
                                                                                 build_dir: Path) -> None:
    steps = 30
    flags = ["--steps", str(steps), "--batch", "8", "--seq", "16", "--eval-problems", "1", "--export", "none",
             "--device", "cpu", "--log-every", "1", "--save-every", "1", "--keep-checkpoints", "3"]
    reference = tmp_path / "reference"
    run_ferry(build_dir, *flags, "--out", str(reference))
    out = tmp_path / "killed"
    process = subprocess.Popen([str(build_dir / "ferry"), "finetune", *flags, "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_records(process, out / "metrics.jsonl", 1 + int(os.urandom(1)[0]) % (steps // 2))
    time.sleep(int(os.urandom(1)[0]) / 255 * 0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    run_ferry(build_dir, *flags, "--out", str(out), "--resume", "auto")
    assert losses(out) == losses(reference)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == steps
    final = f"checkpoints/step-{steps:06d}"
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (out / final / name).read_bytes() == (reference / final / name).read_bytes()
