#!/usr/bin/env python3
"""Compare ferry's model families with transformers, both ways.

For each family (GPT-2, OPT in pre- and post-norm, LLaMA, LLaMA with llama3 RoPE scaling,
Mistral with a sliding window, Qwen2 with tied embeddings) this script
  1. builds a small random Hugging Face model (weights perturbed so logits are O(1)) and
     save_pretrained()s it,
  2. runs ferry on it (examples/hf_logits.cpp: from_pretrained, forward) and compares logits
     with transformers' in float32 and in bfloat16,
  3. has ferry save_pretrained() the model, loads that directory with transformers'
     from_pretrained (no missing or unexpected keys allowed) and compares logits again.

Run on the GPU machine with its transformers (5.x) after building ferry's examples:
    /opt/torch/.venv/bin/python tools/hf_compare.py --ferry build/examples/example_hf_logits
It prints one table and exits non-zero when any check fails.
"""

import argparse
import inspect
import os
import subprocess
import sys
import tempfile
import traceback

import torch
import transformers
from safetensors.torch import load_file, save_file

# Tolerances on max |logit difference|.
FP32_TOL = 2e-3          # same math, different kernels (SDPA variants, reduction order)
BF16_REL_TOL = 0.05      # both in bf16: at most 5% of the largest fp32 logit
BF16_RATIO = 3.0         # and ferry-bf16 vs fp32 at most 3x transformers' own bf16 error
ROUNDTRIP_TOL = 1e-5     # identical weights through ferry's writer, transformers both times

VOCAB, SEQ, BATCH = 1000, 24, 2


def rope_kwargs(config_class, theta, scaling=None):
    """rope settings as this transformers version spells them (5.x: rope_parameters)."""
    params = inspect.signature(config_class.__init__).parameters
    if "rope_parameters" in params:
        rope = {"rope_type": "default", "rope_theta": theta}
        if scaling:
            rope.update(scaling)
        return {"rope_parameters": rope}
    kwargs = {"rope_theta": theta}
    if scaling:
        kwargs["rope_scaling"] = scaling
    return kwargs


def families():
    llama_common = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=344,
                        max_position_embeddings=256)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return [
        ("gpt2", transformers.GPT2LMHeadModel,
         transformers.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=128, n_layer=3,
                                 n_head=4)),
        ("opt", transformers.OPTForCausalLM,
         transformers.OPTConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=3,
                                ffn_dim=256, num_attention_heads=4, max_position_embeddings=128,
                                word_embed_proj_dim=64)),
        ("opt-postnorm", transformers.OPTForCausalLM,
         transformers.OPTConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=3,
                                ffn_dim=256, num_attention_heads=4, max_position_embeddings=128,
                                word_embed_proj_dim=64, do_layer_norm_before=False)),
        ("llama", transformers.LlamaForCausalLM,
         transformers.LlamaConfig(**llama_common,
                                  **rope_kwargs(transformers.LlamaConfig, 10000.0))),
        ("llama3-rope", transformers.LlamaForCausalLM,
         transformers.LlamaConfig(**llama_common,
                                  **rope_kwargs(transformers.LlamaConfig, 500000.0, llama3))),
        ("mistral", transformers.MistralForCausalLM,
         transformers.MistralConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=1,
                                    intermediate_size=320, max_position_embeddings=256,
                                    sliding_window=16)),
        ("qwen2", transformers.Qwen2ForCausalLM,
         transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=320, max_position_embeddings=256,
                                  tie_word_embeddings=True,
                                  **rope_kwargs(transformers.Qwen2Config, 1000000.0))),
    ]


def hf_logits(model, tokens, device, dtype):
    model = model.to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        return model(tokens.to(device)).logits.float().cpu()


def ferry_logits(binary, model_dir, tokens_path, out_path, device, dtype, save_dir=None):
    command = [binary, model_dir, tokens_path, out_path, "--dtype", dtype, "--device", device]
    if save_dir:
        command += ["--save", save_dir]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")
    return load_file(out_path)["logits"]


def max_error(a, b):
    return (a.double() - b.double()).abs().max().item()


def compare_family(name, model_class, config, binary, device, work, rows):
    torch.manual_seed(0)
    model = model_class(config)
    with torch.no_grad():  # move off the 0.02-std init so that logits are O(1)
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    hf_dir = os.path.join(work, name, "hf")
    model.save_pretrained(hf_dir)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), dtype=torch.long)
    tokens_path = os.path.join(work, name, "tokens.safetensors")
    save_file({"tokens": tokens}, tokens_path)
    out = os.path.join(work, name, "logits.safetensors")

    hf32 = hf_logits(model, tokens, device, torch.float32)
    hf16 = hf_logits(model, tokens, device, torch.bfloat16)
    ferry_dir = os.path.join(work, name, "ferry")
    ferry32 = ferry_logits(binary, hf_dir, tokens_path, out, device, "float32", ferry_dir)
    ferry16 = ferry_logits(binary, hf_dir, tokens_path, out, device, "bfloat16")

    err32 = max_error(ferry32, hf32)
    rows.append((name, "fp32 ferry vs transformers", err32, FP32_TOL, err32 <= FP32_TOL))
    err16 = max_error(ferry16, hf16)
    bf16_tol = BF16_REL_TOL * hf32.abs().max().item()
    rows.append((name, "bf16 ferry vs transformers", err16, bf16_tol, err16 <= bf16_tol))
    own = max_error(hf16, hf32)
    ours = max_error(ferry16, hf32)
    limit = BF16_RATIO * own + 1e-3
    rows.append((name, f"bf16 ferry vs fp32 (transformers' own bf16: {own:.3g})", ours, limit,
                 ours <= limit))

    reloaded, info = model_class.from_pretrained(ferry_dir, output_loading_info=True)
    unexpected = [k for k in info.get("unexpected_keys", [])]
    missing = [k for k in info.get("missing_keys", [])]
    keys_ok = not unexpected and not missing
    rows.append((name, f"ferry checkpoint keys (missing {missing[:3]}, unexpected "
                       f"{unexpected[:3]})", 0.0, 0.0, keys_ok))
    err_rt = max_error(hf_logits(reloaded, tokens, device, torch.float32), hf32)
    rows.append((name, "fp32 transformers on ferry's checkpoint", err_rt, ROUNDTRIP_TOL,
                 err_rt <= ROUNDTRIP_TOL))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ferry", default="build/examples/example_hf_logits",
                        help="path to the example_hf_logits binary")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    args = parser.parse_args()
    binary = os.path.abspath(args.ferry)
    if not os.access(binary, os.X_OK):
        sys.exit(f"hf_compare: {binary} is not an executable; build ferry's examples first")

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"device {args.device}")
    work = tempfile.mkdtemp(prefix="ferry-hf-compare-")
    rows = []
    for name, model_class, config in families():
        try:
            compare_family(name, model_class, config, binary, args.device, work, rows)
        except Exception:  # one broken family must not hide the others' results
            traceback.print_exc()
            rows.append((name, "exception (traceback above)", float("nan"), 0.0, False))

    width = max(len(row[1]) for row in rows)
    print(f"\n{'family':<13} {'check':<{width}} {'max abs err':>12} {'tolerance':>10}  result")
    for name, check, error, tolerance, ok in rows:
        print(f"{name:<13} {check:<{width}} {error:>12.3e} {tolerance:>10.1e}  "
              f"{'ok' if ok else 'FAIL'}")
    failures = sum(1 for row in rows if not row[4])
    print(f"\n{len(rows) - failures}/{len(rows)} checks passed; work directory {work}")
    if not args.keep and failures == 0:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
