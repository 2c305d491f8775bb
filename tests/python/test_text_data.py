"""A model's own tokenizer end to end through the CLI and the Python API: every dataset format on a
tiny model with a fixture tokenizer (tests/tokenizer/fixtures, made by Hugging Face tokenizers),
held-out evaluation, the export that deploys, and generation."""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

import ferry

FIXTURES = Path(__file__).resolve().parents[1] / "tokenizer" / "fixtures"
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 32, 2, 4, 2, 64, 768


def write_safetensors(path: Path, tensors: Dict[str, torch.Tensor]) -> None:
    header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    blobs = []
    for name, tensor in tensors.items():
        data = tensor.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for blob in blobs:
            file.write(blob)


def make_model(directory: Path, tokenizer_fixture: str, **config_fields: object) -> Path:
    """A tiny LLaMA-shaped Hugging Face directory with random weights and a fixture's tokenizer files."""
    directory.mkdir(parents=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB,
              "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "intermediate_size": INTERMEDIATE, "max_position_embeddings": 256,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32"}
    config.update(config_fields)
    (directory / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(3)
    head_dim = HIDDEN // HEADS
    tensors = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=generator) * 0.02}
    for i in range(LAYERS):
        prefix = f"model.layers.{i}."
        shapes = {"self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
                  "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                  "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
                  "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE)}
        for name, shape in shapes.items():
            tensors[prefix + name] = torch.randn(*shape, generator=generator) * 0.02
        tensors[prefix + "input_layernorm.weight"] = torch.ones(HIDDEN)
        tensors[prefix + "post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    tensors["model.norm.weight"] = torch.ones(HIDDEN)
    tensors["lm_head.weight"] = torch.randn(VOCAB, HIDDEN, generator=generator) * 0.02
    write_safetensors(directory / "model.safetensors", tensors)
    for file in (FIXTURES / "hf" / tokenizer_fixture).iterdir():
        if file.name != "reference.json":
            shutil.copy(file, directory / file.name)
    return directory


def ferry_cli(build_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    run = subprocess.run([str(build_dir / "ferry"), *args], capture_output=True, text=True)
    if check and run.returncode != 0:
        raise AssertionError(f"ferry {' '.join(args)} failed ({run.returncode}):\n{run.stderr}")
    return run


def finetune(build_dir: Path, model: Path, out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return ferry_cli(build_dir, "finetune", "--model", str(model), "--out", str(out), "--device", "cpu",
                     "--hardware", "h100", "--steps", "2", "--batch", "2", "--seq", "96", "--warmup", "0",
                     "--log-every", "1", *args, check=check)


def split_learned(tokenizer: ferry.Tokenizer, tokens: List[int], learned: List[int]) -> Tuple[str, str]:
    return (tokenizer.decode([t for t, keep in zip(tokens, learned) if keep]),
            tokenizer.decode([t for t, keep in zip(tokens, learned) if not keep]))


FORMATS = {
    "text": ({"text": "The fox runs."}, "The fox runs.<|im_end|>", ""),
    "prompt-completion": ({"prompt": "2+2=", "completion": "4"}, "4<|im_end|>", "2+2="),
    "alpaca": ({"instruction": "Add", "input": "2 and 2", "output": "4"}, "4<|im_end|>",
               "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nAdd\n2 and 2<|im_end|>\n"
               "<|im_start|>assistant\n\n"),
    "messages": ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}]},
                 "Hello!<|im_end|>Bye.<|im_end|>",
                 "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                 "<|im_start|>assistant\n\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n\n"),
    "sharegpt": ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Q?"},
                                    {"from": "gpt", "value": "A."}]}, "A.<|im_end|>",
                 "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n\n"),
}


@pytest.mark.parametrize("data_format", sorted(FORMATS))
def test_each_format_trains_and_learns_exactly_the_answers(tmp_path: Path, build_dir: Path, data_format: str) -> None:
    model = make_model(tmp_path / "model", "qwen2")
    record, learned_text, prompt_text = FORMATS[data_format]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(record) for _ in range(4)) + "\n")
    shown = ferry_cli(build_dir, "tokenize", "--model", str(model), "--data", str(data), "--data-format", data_format,
                      "--show", "1")
    example = json.loads(shown.stdout.splitlines()[0])
    tokenizer = ferry.Tokenizer(model)
    assert split_learned(tokenizer, example["tokens"], example["learned"]) == (learned_text, prompt_text)

    run = finetune(build_dir, model, tmp_path / "run", "--data", str(data), "--eval-data", str(data), "--eval-every", "1")
    assert f"data: {data}: 4 examples" in run.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert evals[-1]["eval_perplexity"] == pytest.approx(math.exp(evals[-1]["eval_loss"]), rel=1e-12)
    assert "eval after 2 steps: loss" in run.stderr
    packing = "packed" if data_format == "text" else "one example per row"
    assert packing in run.stderr


def test_bad_records_name_the_file_the_line_and_the_field(tmp_path: Path, build_dir: Path) -> None:
    model = make_model(tmp_path / "model", "qwen2")
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n\n{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}\n')
    run = finetune(build_dir, model, tmp_path / "run", "--data", str(data), check=False)
    assert run.returncode == 1
    assert f"{data}:3: field \"messages\"[1][\"role\"] is \"bot\" (valid: system, user, assistant)" in run.stderr


def test_the_export_deploys_with_the_source_tokenizer_files(tmp_path: Path, build_dir: Path) -> None:
    tokenizer = ferry.Tokenizer(FIXTURES / "hf" / "qwen2")
    model = make_model(tmp_path / "model", "qwen2", eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(FORMATS["messages"][0]) + "\n")
    finetune(build_dir, model, tmp_path / "run", "--data", str(data), "--export-precision", "bf16")
    export = tmp_path / "run" / "hf"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (export / name).read_bytes() == (model / name).read_bytes(), name
    config = json.loads((export / "config.json").read_text())
    assert config["eos_token_id"] == tokenizer.eos_token_id and config["pad_token_id"] == tokenizer.pad_token_id
    assert config["torch_dtype"] == "bfloat16"
    generation = json.loads((export / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    # It loads back into ferry, tokenizer and all.
    exported = ferry.Tokenizer(export)
    assert exported.encode("Hello world") == tokenizer.encode("Hello world")
    assert ferry.LayeredModel.from_pretrained(export).parameter_count > 0
    # And ferry generate reads it, and the run's checkpoint finds its tokenizer through the run.
    for source in (export, tmp_path / "run" / "checkpoints" / "step-000002"):
        run = ferry_cli(build_dir, "generate", "--model", str(source), "--prompt", "Hi", "--chat", "--max-new-tokens",
                        "4", "--device", "cpu")
        assert "generate: " in run.stderr and "prompt tokens" in run.stderr


def test_a_model_directory_without_a_tokenizer_needs_tokenized_data(tmp_path: Path, build_dir: Path) -> None:
    model = make_model(tmp_path / "model", "qwen2")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model / name).unlink()
    text = tmp_path / "train.jsonl"
    text.write_text('{"text": "hello"}\n')
    run = finetune(build_dir, model, tmp_path / "run", "--data", str(text), check=False)
    assert run.returncode == 1
    assert "has no tokenizer: looked for" in run.stderr and "tokenizer.model" in run.stderr
    tokens = tmp_path / "train.bin"
    tokens.write_bytes(struct.pack("<200H", *([5, 6, 7, 8] * 50)))
    finetune(build_dir, model, tmp_path / "run", "--data", str(tokens))


def test_tokenize_prints_the_reference_ids_and_writes_token_files(tmp_path: Path, build_dir: Path) -> None:
    reference = json.loads((FIXTURES / "hf" / "llama3" / "reference.json").read_text())
    for case in reference["cases"][1:6]:
        run = ferry_cli(build_dir, "tokenize", "--model", str(FIXTURES / "hf" / "llama3"), "--text", case["text"])
        assert json.loads(run.stdout.splitlines()[-1]) == case["ids"]
    spm = json.loads((FIXTURES / "sentencepiece" / "reference.json").read_text())
    run = ferry_cli(build_dir, "tokenize", "--model", str(FIXTURES / "sentencepiece" / "tokenizer.model"), "--text",
                    spm["cases"][3]["text"])
    assert json.loads(run.stdout.splitlines()[-1]) == spm["cases"][3]["ids"]

    data = tmp_path / "docs.txt"
    data.write_text("first document\n\nsecond one\n")
    out = tmp_path / "docs.bin"
    ferry_cli(build_dir, "tokenize", "--model", str(FIXTURES / "hf" / "gpt2"), "--data", str(data), "--out", str(out))
    tokenizer = ferry.Tokenizer(FIXTURES / "hf" / "gpt2")
    eos = tokenizer.eos_token_id
    expected = tokenizer.encode("first document") + [eos] + tokenizer.encode("second one") + [eos]
    assert list(struct.unpack(f"<{len(expected)}H", out.read_bytes())) == expected
    wide = tmp_path / "wide.u32.bin"
    ferry_cli(build_dir, "tokenize", "--model", str(FIXTURES / "hf" / "gpt2"), "--data", str(data), "--out", str(wide))
    assert list(struct.unpack(f"<{len(expected)}I", wide.read_bytes())) == expected


def test_the_python_tokenizer_and_templates_match_the_reference() -> None:
    reference = json.loads((FIXTURES / "hf" / "qwen2" / "reference.json").read_text())
    tokenizer = ferry.Tokenizer(FIXTURES / "hf" / "qwen2")
    texts = [case["text"] for case in reference["cases"]]
    assert tokenizer.encode_batch(texts) == [case["ids"] for case in reference["cases"]]
    assert [tokenizer.decode(case["ids"]) for case in reference["cases"]] == [c["decoded"] for c in reference["cases"]]
    renders = json.loads((FIXTURES / "chat_templates.json").read_text())
    for render in renders["renders"]:
        if render["template"] != "qwen2" or "rendered" not in render:
            continue
        conversation = renders["conversations"][render["conversation"]]
        assert tokenizer.apply_chat_template(conversation, render["add_generation_prompt"]) == render["rendered"]
    assert "llama3" in ferry.chat_template_names()
    assert ferry.Tokenizer.byte_level().encode("<s>a") == [256, ord("a")]


def test_evaluate_over_a_loader_is_the_token_weighted_mean(tmp_path: Path) -> None:
    tokenizer = ferry.Tokenizer(FIXTURES / "hf" / "qwen2")
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Question {i}?", "completion": " Answer" * (i + 1)})
                              for i in range(5)) + "\n")
    model = make_model(tmp_path / "model", "qwen2")
    dataset = ferry.data.open_dataset(data, 32, tokenizer=tokenizer)
    engine = ferry.Engine(str(model), mode="gpu", device="cpu")

    def loader() -> ferry.data.DataLoader:
        return ferry.data.DataLoader(dataset, 2, 32, pack=False, answer_only=True, shuffle=False,
                                     pad_token=tokenizer.pad_token_id, single_pass=True)

    result = engine.evaluate(loader())
    batches = list(loader())
    assert result["batches"] == len(batches) == 3
    reference = ferry.LayeredModel.from_pretrained(model)
    total, count = 0.0, 0
    for batch in batches:
        with torch.no_grad():
            logits = reference.forward(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), labels.reshape(-1),
                                                   ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
