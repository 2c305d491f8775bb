#!/usr/bin/env python3
"""PEFT's own LoRA output as fixtures for ferry's LoRA tests (tests/model/fixtures/peft).

  peft_fixtures.py --out DIR

Run where transformers and peft are installed (the GPU machine; this is how the committed
fixtures were made, the versions go into DIR/versions.json). Writes, all tiny:
  DIR/base/                 a seeded 2-block llama (config.json, model.safetensors), fp32
  DIR/all-linear/           PeftModel.save_pretrained of LoraConfig(r=4, lora_alpha=8,
                            target_modules="all-linear"), with lora_B set to seeded values so the
                            adapter changes the output (PEFT initialises B to zero)
  DIR/q-v/                  the same with target_modules=["q_proj", "v_proj"]
  DIR/merged/               merge_and_unload() of all-linear, saved as a full model
  DIR/reference.safetensors input_ids and the logits of the base, of the all-linear adapter and
                            of the merged model on them, plus the freshly initialised lora_A of
                            the first q_proj (PEFT's Kaiming-uniform) for the shape of its range
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )


def adapted(base_dir: str, targets, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                        task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return peft_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import peft
    import safetensors.torch
    import transformers
    from transformers import LlamaForCausalLM

    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config()).eval()
    base_dir = os.path.join(args.out, "base")
    base.save_pretrained(base_dir, safe_serialization=True)

    input_ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(7))
    tensors = {"input_ids": input_ids}
    with torch.no_grad():
        tensors["base_logits"] = base(input_ids).logits.contiguous()

    torch.manual_seed(1)
    fresh = adapted(base_dir, "all-linear", seed=1)
    tensors["fresh_lora_A"] = next(
        p for n, p in fresh.named_parameters() if "layers.0.self_attn.q_proj.lora_A" in n
    ).detach().clone()

    all_linear = adapted(base_dir, "all-linear", seed=2).eval()
    all_linear.save_pretrained(os.path.join(args.out, "all-linear"))
    with torch.no_grad():
        tensors["adapter_logits"] = all_linear(input_ids).logits.contiguous()

    adapted(base_dir, ["q_proj", "v_proj"], seed=3).save_pretrained(os.path.join(args.out, "q-v"))

    merged = all_linear.merge_and_unload().eval()
    merged.save_pretrained(os.path.join(args.out, "merged"), safe_serialization=True)
    with torch.no_grad():
        tensors["merged_logits"] = merged(input_ids).logits.contiguous()

    safetensors.torch.save_file(tensors, os.path.join(args.out, "reference.safetensors"))
    for adapter in ("all-linear", "q-v"):
        os.remove(os.path.join(args.out, adapter, "README.md"))  # PEFT's model card template
    with open(os.path.join(args.out, "versions.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                   "peft": peft.__version__}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
