"""ferry.plan: the planner's dry run from Python, against the engine's own sizing."""

import json
import subprocess

import pytest

import ferry


def test_plan_reports_tiers_time_and_bottleneck():
    plan = ferry.plan("llama-1.3b", "zero-offload", batch=8, seq=1024, hardware="h100",
                      precision="bf16")
    assert plan.fits
    assert plan.tier_bytes("gpu") > 0 and plan.tier_bytes("host") > plan.tier_bytes("gpu")
    assert plan.step_seconds > 0 and plan.tokens_per_s > 0
    assert plan.bottleneck in {"GPU compute", "PCIe up", "PCIe down", "NVMe read", "NVMe write",
                               "CPU optimizer"}
    assert "zero-offload" in str(plan)
    assert "llama-1.3b" in repr(plan)


def test_plan_of_one_rank_among_several():
    one = ferry.plan("llama-1.3b", "zero-offload", hardware="h100", precision="bf16")
    four = ferry.plan("llama-1.3b", "zero-offload", hardware="h100", precision="bf16", gpus=4,
                      link_gbps=150)
    assert four.data["world_size"] == 4
    assert four.tier_bytes("host") < one.tier_bytes("host") / 2
    assert four.data["resources"]["collectives"]["moved_bytes"] > 0
    assert "ranks: 4" in str(four)


def test_plan_that_does_not_fit_names_a_fix(tmp_path):
    plan = ferry.plan("llama-6.7b", "gpu", batch=4, seq=1024, hardware="h100", precision="bf16",
                      gpu_budget="16GiB", trace=tmp_path / "step.json")
    assert not plan.fits
    assert plan.fixes
    assert (tmp_path / "step.json").read_text().startswith("{")


def test_plan_rejects_bad_requests():
    with pytest.raises(ferry.Error, match="unknown model preset"):
        ferry.plan("llama-nope", hardware="h100")
    with pytest.raises(ferry.Error, match="at most one of hardware"):
        ferry.plan("tiny-llama", hardware="h100", calibration="figures.json")
    with pytest.raises(ferry.Error, match="mode"):
        ferry.plan("tiny-llama", "sideways", hardware="h100")


def test_plan_replays_measured_compute():
    # tiny-llama: the stem, 2 blocks and the head; blocks of 10 ms forward, 30 ms backward with
    # recomputation, measured at the planned micro-batch.
    measured = {"batch": 4, "seq": 16, "part_forward_seconds": [0.001, 0.01, 0.01, 0.002],
                "part_backward_seconds": [0.001, 0.03, 0.03, 0.004], "cpu_update_params_per_s": 2e9}
    plan = ferry.plan("tiny-llama", "gpu", batch=4, seq=16, hardware="h100", precision="fp32",
                      measured=measured)
    assert "compute: measured at batch 4 x seq 16" in str(plan)
    assert plan.data["measured_compute"]
    # Every block recomputed: the measured seconds, and the device's AdamW (microseconds) on top.
    assert plan.data["resources"]["GPU compute"]["busy_seconds"] == pytest.approx(0.088, rel=1e-4)
    with pytest.raises(ferry.Error, match="measured compute has no 'seq'"):
        ferry.plan("tiny-llama", hardware="h100", measured={"batch": 4})
    with pytest.raises(ferry.Error, match="the model has 4 parts"):
        ferry.plan("tiny-llama", hardware="h100", measured={**measured, "part_forward_seconds": [0.1]})


def test_calibrate_measures_this_machine_and_plan_reads_the_file(tmp_path):
    figures = ferry.calibrate([tmp_path], nvme_bytes="8MiB", repeat=1, out=tmp_path / "hw.json")
    assert figures["cpu_adam_params_per_s"] > 0
    assert figures["pcie_h2d_gbps"] > 0
    assert len(figures["nvme"]) == 1 and figures["nvme"][0]["read_gbps"] > 0
    plan = ferry.plan("tiny-llama", "zo2", batch=2, seq=64, calibration=tmp_path / "hw.json")
    assert plan.fits


def test_calibrate_rejects_a_missing_directory(tmp_path):
    with pytest.raises(ferry.Error, match="missing.*writable directory"):
        ferry.calibrate([tmp_path / "missing"], nvme_bytes="1MiB", repeat=1)


def test_finetune_fuyou_profiles_plans_and_compares_the_step_time(tmp_path, build_dir):
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    out = tmp_path / "run"
    run = subprocess.run([str(build_dir / "ferry"), "finetune", "--mode", "fuyou", "--nvme", str(nvme),
                          "--activations", "auto", "--steps", "3", "--batch", "4", "--seq", "16",
                          "--warmup", "1", "--eval-problems", "1", "--log-every", "1", "--device", "cpu",
                          "--out", str(out)], check=True, capture_output=True, text=True)
    assert "profiling two steps" in run.stderr
    assert "fuyou mode" in run.stderr and "host blocks" in run.stderr  # the plan's table
    assert "measured / predicted" in run.stderr
    # The job file holds the plan's choices and runs as an engine config.
    job = json.loads((out / "config.json").read_text())
    assert len(job["activations"]) == 2 and set(job["activations"]) <= {"gpu", "host", "nvme"}
    assert isinstance(job["fuyou_host_blocks"], int)
    ferry.Engine(config=job)
