"""ferry.Engine on built-in models: every binding, errors, and the same run as the C++ CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

import ferry

from conftest import requires_cuda

SETTINGS: Dict[str, Any] = dict(device="cpu", lr=3e-3, weight_decay=0.01, seed=7)


def loader(seed: int = 1, batch: int = 4, seq: int = 16) -> ferry.data.DataLoader:
    dataset = ferry.data.addition_dataset(max_digits=2, seed=seed, split="train", count=256)
    return ferry.data.DataLoader(dataset, batch_size=batch, sequence_length=seq, pack=False,
                                 answer_only=True, seed=seed)


def losses(engine: ferry.Engine, batches: ferry.data.DataLoader, steps: int) -> List[float]:
    return [engine.train_step(next(batches)).loss for _ in range(steps)]


@pytest.mark.parametrize("mode", ["zero-offload", "zo2"])
def test_a_python_run_equals_the_cli_run(mode: str, tmp_path: Path, build_dir: Path) -> None:
    out = tmp_path / "cli"
    subprocess.run([str(build_dir / "ferry"), "finetune", "--mode", mode, "--steps", "4",
                    "--batch", "4", "--seq", "16", "--warmup", "1", "--eval-problems", "1",
                    "--log-every", "1", "--device", "cpu", "--out", str(out)],
                   check=True, capture_output=True)
    cli_steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    # The job file the CLI resolved is a valid Engine config as it stands.
    job = json.loads((out / "config.json").read_text())
    if mode == "zo2":  # zo2's own defaults: plain ZO-SGD, nothing to clip
        assert (job["optimizer"], job["max_grad_norm"], job["weight_decay"]) == ("sgd", 0.0, 0.0)
    engine = ferry.Engine(config=job)
    dataset = ferry.data.addition_dataset(job["demo_digits"], job["seed"], "train", 20000)
    batches = ferry.data.DataLoader(dataset, job["batch"], job["seq"], pack=False,
                                    answer_only=True, seed=job["seed"])
    python_steps = [engine.train_step(next(batches)) for _ in range(job["steps"])]

    assert [s.loss for s in python_steps] == [s["loss"] for s in cli_steps]
    assert [s.grad_norm for s in python_steps] == [s["grad_norm"] for s in cli_steps]
    assert [s.lr for s in python_steps] == [s["lr"] for s in cli_steps]


def test_zo2_results_and_flush() -> None:
    engine = ferry.Engine("tiny-opt", {**SETTINGS, "lr": 1e-4}, mode="zo2", optimizer="sgd",
                          zo_samples=2)
    batches = loader()
    result = engine.train_step(next(batches))
    assert len(result.loss_plus) == len(result.loss_minus) == len(result.projected_grads) == 2
    assert result.loss == pytest.approx(sum(result.loss_plus + result.loss_minus) / 4)
    engine.flush()
    engine.flush()  # idempotent
    with pytest.raises(ferry.Error, match="zo2"):
        engine.forward(next(batches))
    assert engine.mode == "zo2"


def test_forward_backward_step_equals_train_step() -> None:
    one_call = ferry.Engine("tiny-llama", **SETTINGS)
    three_calls = ferry.Engine("tiny-llama", SETTINGS)
    expected = losses(one_call, loader(), 3)
    batches = loader()
    actual = []
    for _ in range(3):
        loss = three_calls.forward(next(batches))
        assert loss.dim() == 0 and loss.requires_grad
        three_calls.backward(loss)
        actual.append(three_calls.step().loss)
    assert actual == expected
    assert three_calls.steps_taken == 3


def test_gradient_accumulation_returns_a_result_every_n_micro_batches() -> None:
    engine = ferry.Engine("tiny-gpt2", grad_accum=2, **SETTINGS)
    batches = loader()
    assert engine.train_step(next(batches)) is None
    result = engine.train_step(next(batches))
    assert isinstance(result, ferry.StepResult) and result.step == 1
    assert result.tokens == 2 * 4 * 16
    assert "StepResult(step=1, loss=" in repr(result)


def test_inference_bindings() -> None:
    engine = ferry.Engine("tiny-llama", **SETTINGS)
    batch = next(loader())
    before = engine.evaluate(batch)
    assert isinstance(before, float) and before == pytest.approx(engine.evaluate(batch))
    logits = engine.logits(batch["input_ids"])
    assert logits.shape == (*batch["input_ids"].shape, 512) and not logits.requires_grad
    generated = engine.generate([ferry.data.ByteTokenizer.BOS, 48, 43], max_new_tokens=3)
    assert len(generated) <= 3 and all(isinstance(t, int) for t in generated)
    assert engine.generate(torch.tensor([1, 2]), 2) == engine.generate([1, 2], 2)
    assert engine.steps_taken == 0


def test_checkpoints_resume_exactly_and_load_as_a_hugging_face_directory(tmp_path: Path) -> None:
    uninterrupted = losses(ferry.Engine("tiny-llama", **SETTINGS), loader(), 4)

    first = ferry.Engine("tiny-llama", **SETTINGS)
    batches = loader()
    losses(first, batches, 2)
    first.save(tmp_path / "step-2", extra={"loader": batches.state()})
    assert (tmp_path / "step-2" / "config.json").exists()

    resumed = ferry.Engine("tiny-llama", **SETTINGS)
    extra = resumed.load(tmp_path / "step-2")
    batches = loader()
    batches.restore(extra["loader"])
    assert resumed.steps_taken == 2
    assert losses(resumed, batches, 2) == uninterrupted[2:]

    # The checkpoint's weights are a Hugging Face directory the engine loads as a model.
    from_directory = ferry.Engine(str(tmp_path / "step-2"), device="cpu")
    tokens = next(loader())["input_ids"]
    torch.testing.assert_close(from_directory.logits(tokens), first.logits(tokens))
    assert ferry.LayeredModel.from_pretrained(tmp_path / "step-2").num_blocks == 2


def test_lora_keywords_train_adapters_that_export_for_peft_and_merged(tmp_path: Path) -> None:
    engine = ferry.Engine("tiny-llama", lora_rank=4, lora_alpha=16, lora_targets="q_proj,v_proj", **SETTINGS)
    trained = losses(engine, loader(), 6)
    assert trained[-1] < trained[0]
    engine.export_adapter(tmp_path / "adapter", "tiny-llama")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 16)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "tiny-llama"
    # The merged export is a plain model computing what base + adapters compute.
    engine.export_pretrained(tmp_path / "merged")
    merged = ferry.Engine(str(tmp_path / "merged"), device="cpu")
    tokens = next(loader())["input_ids"]
    torch.testing.assert_close(merged.logits(tokens), engine.logits(tokens), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="LoRA settings apply to a preset"):
        ferry.Engine(ferry.LayeredModel.preset("tiny-llama"), lora_rank=4, device="cpu")


def test_stats_repr_and_properties() -> None:
    engine = ferry.Engine("tiny-llama", mode="zero-offload", **SETTINGS)
    losses(engine, loader(), 2)
    stats = engine.stats()
    assert stats["steps"] == 2
    assert stats["forward_seconds"] > 0 and stats["optimizer_seconds"] > 0
    assert set(stats["tiers"]) == {"gpu", "host", "nvme"}
    assert stats["tiers"]["host"]["peak_bytes"] > 0
    assert stats["transfers"]["gpu->host"]["bytes"] > 0
    assert engine.mode == "zero-offload" and engine.precision == "fp32"
    assert engine.device == torch.device("cpu")
    assert engine.current_lr == pytest.approx(3e-3)
    assert repr(engine).startswith("ferry.Engine(mode='zero-offload', precision='fp32'")
    assert len(engine.parameters()) == len(engine.model.parameters())
    assert engine.model.parameter_count == sum(p.numel() for p in engine.parameters())
    assert "tiny-llama" in ferry.preset_names()
    assert ferry.__version__.count(".") == 2


def test_an_engine_counts_every_parameter_wherever_it_lives(tmp_path) -> None:
    # fuyou keeps most parameters on NVMe, unbound from the model between their uses.
    engine = ferry.Engine("tiny-llama", mode="fuyou", nvme=[str(tmp_path)], device="cpu")
    assert "parameters=156480," in repr(engine)


def test_keyword_settings_override_the_config_dict() -> None:
    engine = ferry.Engine("tiny-gpt2", {"mode": "zero-offload", "device": "cpu"}, mode="gpu")
    assert engine.mode == "gpu"
    assert "lr" in ferry.engine.engine_settings()


def test_bad_settings_raise_ferry_errors() -> None:
    with pytest.raises(ferry.Error, match="unknown engine setting 'learning_rate'.*valid"):
        ferry.Engine("tiny-gpt2", learning_rate=1.0)
    with pytest.raises(ferry.Error, match="unknown mode 'warp'"):
        ferry.Engine("tiny-gpt2", mode="warp")
    with pytest.raises(ferry.Error, match="'lr' has the wrong type"):
        ferry.Engine("tiny-gpt2", lr="fast")
    with pytest.raises(ferry.Error, match="grad_accumulation = 0"):
        ferry.Engine("tiny-gpt2", grad_accum=0, device="cpu")
    with pytest.raises(ferry.Error, match="tiny-nothing"):
        ferry.Engine("tiny-nothing")
    with pytest.raises(ValueError, match="dtype"):
        ferry.Engine("tiny-gpt2", dtype="int8")
    with pytest.raises(TypeError, match="needs a model"):
        ferry.Engine()
    with pytest.raises(TypeError, match="not int"):
        ferry.Engine(3)


def test_a_budget_too_small_raises_budget_exceeded() -> None:
    with pytest.raises(ferry.BudgetExceeded, match="short") as caught:
        ferry.Engine("tiny-llama", host_budget="64KiB", device="cpu")
    assert isinstance(caught.value, MemoryError) and isinstance(caught.value, ferry.Error)


def test_bad_batches_raise_clear_errors() -> None:
    engine = ferry.Engine("tiny-gpt2", **SETTINGS)
    tokens = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(TypeError, match="a batch needs 'labels'"):
        engine.train_step({"input_ids": tokens})
    with pytest.raises(TypeError, match="'labels' must be a torch.Tensor, not list"):
        engine.train_step({"input_ids": tokens, "labels": [1, 2]})
    with pytest.raises(ferry.Error, match=r"labels has shape \[2, 4\] but input_ids \[2, 8\]"):
        engine.train_step({"input_ids": tokens, "labels": tokens[:, :4]})

    class Batch:
        input_ids = tokens
        labels = tokens

    assert engine.train_step(Batch()).step == 1


def test_loading_a_missing_checkpoint_raises(tmp_path: Path) -> None:
    engine = ferry.Engine("tiny-gpt2", **SETTINGS)
    with pytest.raises(ferry.Error, match="nowhere"):
        engine.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):
        ferry.LayeredModel.from_pretrained(tmp_path / "nowhere")


@requires_cuda
def test_zero_offload_follows_the_gpu_mode_on_cuda() -> None:
    reference = losses(ferry.Engine("tiny-llama", mode="gpu", device="cuda", seed=7), loader(), 5)
    offloaded = losses(ferry.Engine("tiny-llama", mode="zero-offload", device="cuda", seed=7),
                       loader(), 5)
    assert offloaded == pytest.approx(reference, rel=1e-4)


def test_mode_auto_plans_the_placement_and_trains_as_the_gpu_mode_does() -> None:
    """mode="auto" places the parts with ferry.plan for the given micro-batch; on the CPU every
    placement computes the gpu mode's bits."""
    settings = dict(lr=3e-3, device="cpu", seed=3)
    reference = ferry.Engine("tiny-llama", mode="gpu", **settings)
    roomy = ferry.plan("tiny-llama", "auto", batch=4, seq=16, hardware="h100", precision="fp32")
    budget = roomy.tier_bytes("gpu") * 2 // 3
    # The plan from FLOPs alone (profile=False) splits the updates between the two sides.
    placed = ferry.Engine("tiny-llama", mode="auto", batch=4, seq=16, hardware="h100",
                          gpu_budget=budget, profile=False, **settings)
    assert placed.plan is not None and placed.plan.fits
    assert placed.plan.tier_bytes("gpu") <= budget
    assert "compute: measured" not in placed.plan.table
    updates = [part["grads"] for part in placed.plan["placement"]["parts"]]
    assert "host" in updates and "gpu" in updates  # both sides update some parts
    expected = losses(reference, loader(), 5)
    assert losses(placed, loader(), 5) == expected
    # By default it plans twice: the second plan replays a profile of the first one's placement.
    profiled = ferry.Engine("tiny-llama", mode="auto", batch=4, seq=16, hardware="h100",
                            gpu_budget=budget, **settings)
    assert profiled.plan.fits and profiled.plan.tier_bytes("gpu") <= budget
    assert "compute: measured at batch 4 x seq 16" in profiled.plan.table
    assert "CPU updates: measured in the step" in profiled.plan.table
    assert losses(profiled, loader(), 5) == expected
    with pytest.raises(TypeError, match="batch= and seq="):
        ferry.Engine("tiny-llama", mode="auto", hardware="h100", **settings)
