"""ferry.plan: the planner's dry run from Python, against the engine's own sizing."""

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


def test_plan_that_does_not_fit_names_a_fix(tmp_path):
    plan = ferry.plan("llama-6.7b", "gpu", batch=4, seq=1024, hardware="h100", precision="bf16",
                      gpu_budget="16GiB", trace=tmp_path / "step.json")
    assert not plan.fits
    assert plan.fixes
    assert (tmp_path / "step.json").read_text().startswith("{")


def test_plan_rejects_bad_requests():
    with pytest.raises(ferry.Error, match="unknown model preset"):
        ferry.plan("llama-nope", hardware="h100")
    with pytest.raises(ferry.Error, match="exactly one of hardware"):
        ferry.plan("tiny-llama")
    with pytest.raises(ferry.Error, match="mode"):
        ferry.plan("tiny-llama", "sideways", hardware="h100")


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
