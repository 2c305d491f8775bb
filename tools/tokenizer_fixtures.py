#!/usr/bin/env python3
"""Makes the reference fixtures of ferry's tokenizer tests (tests/tokenizer/fixtures/).

Two parts, run on different machines:

  tools/tokenizer_fixtures.py sentencepiece --out tests/tokenizer/fixtures
      here (Debian): trains a small SentencePiece BPE model with Debian's `spm_train` and records
      the ids of tests/tokenizer/fixtures/texts.json with Debian's python3-sentencepiece.

  tools/tokenizer_fixtures.py hf --fixtures DIR --out OUT
      where Hugging Face `tokenizers` and `transformers` are installed (the GPU machine): trains
      small tokenizers of each kind ferry reads (ByteLevel BPE as GPT-2, a Llama-3 style regex
      split, Qwen2 with NFC, Metaspace + byte fallback as Llama-2 in its old normalizer form and
      its newer pre-tokenizer form, and variants of each pre-tokenizer, normalizer and decoder),
      saves each as a model directory would hold it (tokenizer.json, tokenizer_config.json,
      special_tokens_map.json) and records what the reference library gives for every text:
      encode(text, add_special_tokens=False).ids, the same with special tokens, decode(ids) with
      and without skipping special tokens, and the decoding of every id of the vocabulary. It also
      converts the SentencePiece model with transformers' own converter (the path real Llama-2
      and Mistral checkpoints took) and renders the known chat templates with transformers'
      apply_chat_template. Everything goes into OUT/fixtures.tar.gz; errors are recorded per
      fixture in manifest.json instead of stopping the run.

CI never runs this script: it only reads what it wrote.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tarfile
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# The chat templates ferry recognises, exactly as the models ship them (tokenizer_config.json's
# chat_template, JSON-decoded). tests check ferry's rendering against transformers' for each.
CHAT_TEMPLATES = {
    # Qwen/Qwen2-0.5B-Instruct (and the other Qwen2 instruct models)
    "qwen2": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # ChatML without a default system message (teknium/OpenHermes-2.5-Mistral-7B and many others)
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # meta-llama/Meta-Llama-3-8B-Instruct
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
        "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # meta-llama/Llama-2-7b-chat-hf (the \\n are backslash-n inside Jinja string literals)
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    # mistralai/Mistral-7B-Instruct-v0.1
    "mistral-v0.1": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    ),
    # mistralai/Mixtral-8x7B-Instruct-v0.1
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    ),
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hello, how are you?"},
     {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
     {"role": "user", "content": "Tell me a joke."},
     {"role": "assistant", "content": "Why did the chicken cross the road?"}],
    [{"role": "system", "content": "You are a pirate."},
     {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Arr!"}],
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "  padded question  \n"},
     {"role": "assistant", "content": "\n  padded answer  "}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Line one\nLine two"},
     {"role": "assistant", "content": "Answer\n\nwith a blank line"},
     {"role": "user", "content": "Thanks"}],
]


def log_error(manifest: Dict[str, Any], where: str) -> None:
    manifest["errors"].append({"where": where, "error": traceback.format_exc()})
    print(f"error in {where}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)


# --- SentencePiece (here, with Debian's packages) --------------------------------------------------

def make_sentencepiece(fixtures: Path) -> None:
    import sentencepiece

    corpus = fixtures / "corpus.txt"
    out = fixtures / "sentencepiece"
    out.mkdir(parents=True, exist_ok=True)
    # Llama's training settings (BPE, byte fallback, digits split, no normalization), at a tiny
    # vocabulary whose characters do not cover the rarer scripts, so byte fallback is exercised.
    subprocess.run(["spm_train", f"--input={corpus}", f"--model_prefix={out / 'tokenizer'}",
                    "--vocab_size=600", "--model_type=bpe", "--byte_fallback=true",
                    "--character_coverage=0.98", "--split_digits=true", "--normalization_rule_name=identity",
                    "--remove_extra_whitespaces=false", "--allow_whitespace_only_pieces=true",
                    "--add_dummy_prefix=true", "--unk_id=0", "--bos_id=1", "--eos_id=2", "--pad_id=-1",
                    "--minloglevel=2"], check=True)
    (out / "tokenizer.vocab").unlink()
    processor = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    texts = json.loads((fixtures / "texts.json").read_text())
    cases = []
    for text in texts:
        ids = processor.encode(text)
        cases.append({"text": text, "ids": ids, "decoded": processor.decode(ids)})
    every_id = list(range(processor.get_piece_size()))
    decode_cases = [{"ids": every_id[i:i + 40], "decoded": processor.decode(every_id[i:i + 40])}
                    for i in range(0, len(every_id), 40)]
    reference = {"fixture": "sentencepiece", "library": f"python3-sentencepiece {sentencepiece.__version__}",
                 "bos_id": processor.bos_id(), "eos_id": processor.eos_id(), "unk_id": processor.unk_id(),
                 "pad_id": processor.pad_id(), "vocab_size": processor.get_piece_size(),
                 "cases": cases, "decode_cases": decode_cases}
    (out / "reference.json").write_text(json.dumps(reference, ensure_ascii=True, indent=1) + "\n")


# --- Hugging Face (on the machine that has tokenizers and transformers) --------------------------

def corpus_lines(fixtures: Path) -> List[str]:
    return [line for line in (fixtures / "corpus.txt").read_text().split("\n") if line]


def train_byte_level(lines: List[str], special_tokens: List[str], pre_tokenizer: Any,
                     normalizer: Any = None) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=640, min_frequency=2, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(lines, trainer)
    return tokenizer


def with_model_options(tokenizer: Any, **options: Any) -> Any:
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.to_str())
    data["model"].update(options)
    return Tokenizer.from_str(json.dumps(data))


def train_metaspace_with_byte_fallback(lines: List[str]) -> Any:
    """A Llama-2 shaped vocabulary: <unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF>, then BPE
    pieces trained on text whose spaces became ▁ (never merged across a ▁ in the middle)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=600, min_frequency=2, special_tokens=["<unk>", "<s>", "</s>"],
                                  limit_alphabet=110, show_progress=False)
    tokenizer.train_from_iterator(lines, trainer)
    data = json.loads(tokenizer.to_str())
    trained = sorted(data["model"]["vocab"].items(), key=lambda item: item[1])
    vocab: Dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece, _ in trained:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    data["model"]["vocab"] = vocab
    data["model"]["byte_fallback"] = True
    data["model"]["fuse_unk"] = True
    data["added_tokens"] = [
        {"id": vocab[content], "content": content, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True} for content in ("<unk>", "<s>", "</s>")]
    return Tokenizer.from_str(json.dumps(data))


def replace_parts(tokenizer: Any, **parts: Any) -> Any:
    """A copy of the tokenizer with some of its normalizer, pre_tokenizer, decoder and
    post_processor replaced (None removes one)."""
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.to_str())
    for name, value in parts.items():
        if value is None:
            data[name] = None
    copy_ = Tokenizer.from_str(json.dumps(data))
    for name, value in parts.items():
        if value is not None:
            setattr(copy_, name, value)
    return copy_


def with_added_tokens_flags(tokenizer: Any, **flags: Any) -> Any:
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.to_str())
    for token in data["added_tokens"]:
        token.update(flags)
    return Tokenizer.from_str(json.dumps(data))


def save_model_directory(tokenizer: Any, directory: Path, settings: Dict[str, Any], manifest: Dict[str, Any],
                         name: str) -> None:
    """What a checkpoint directory holds for its tokenizer, written by transformers' own
    save_pretrained when it can be (else by hand, noted in the manifest)."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        from transformers import PreTrainedTokenizerFast

        kwargs = {key: settings[key] for key in ("bos_token", "eos_token", "pad_token", "unk_token")
                  if settings.get(key) is not None}
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=settings.get("model_max_length",
                                                                                                 2048), **kwargs)
        if settings.get("chat_template"):
            fast.chat_template = settings["chat_template"]
        fast.save_pretrained(str(directory))
        manifest["saved_by"][name] = "transformers"
    except Exception:
        log_error(manifest, f"{name}: save_pretrained (wrote the files by hand instead)")
        tokenizer.save(str(directory / "tokenizer.json"))
        config = {key: settings[key] for key in ("bos_token", "eos_token", "pad_token", "unk_token")
                  if settings.get(key) is not None}
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config["model_max_length"] = settings.get("model_max_length", 2048)
        if settings.get("chat_template"):
            config["chat_template"] = settings["chat_template"]
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (directory / "special_tokens_map.json").write_text(
            json.dumps({k: v for k, v in config.items() if k.endswith("_token")}, indent=2) + "\n")
        manifest["saved_by"][name] = "hand"


def special_texts(added: List[str]) -> List[str]:
    texts = []
    for token in added:
        texts += [f"x{token}y", f"  {token}  z", f"{token}{token}", f"word{token}", f"{token} word",
                  f"a {token}\n{token} b", f"  {token}"]
    if len(added) >= 2:
        texts.append("".join(added) + " tail")
        texts.append(" mid ".join(added))
    return texts


def reference_for(directory: Path, texts: List[str], manifest: Dict[str, Any], name: str) -> Dict[str, Any]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    added = [token.content for token in tokenizer.get_added_tokens_decoder().values()]
    all_texts = texts + special_texts(sorted(added))
    cases = []
    for text in all_texts:
        case: Dict[str, Any] = {"text": text}
        try:
            encoding = tokenizer.encode(text, add_special_tokens=False)
            case["ids"] = encoding.ids
            case["ids_with_special_tokens"] = tokenizer.encode(text, add_special_tokens=True).ids
            case["decoded"] = tokenizer.decode(encoding.ids, skip_special_tokens=False)
            case["decoded_skipping_special"] = tokenizer.decode(encoding.ids, skip_special_tokens=True)
        except Exception:
            log_error(manifest, f"{name}: encode {text!r}")
            case["error"] = traceback.format_exc(limit=1)
        cases.append(case)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    every_id = list(range(size))
    decode_cases = []
    for start in range(0, size, 37):
        ids = every_id[start:start + 37]
        decode_cases.append({"ids": ids, "decoded": tokenizer.decode(ids, skip_special_tokens=False),
                             "decoded_skipping_special": tokenizer.decode(ids, skip_special_tokens=True)})
    # Lone bytes of multi-byte characters and special tokens between them: lossy UTF-8 decoding.
    mixed = [every_id[-1], 0, every_id[len(every_id) // 2], every_id[-1]] + every_id[100:110] + every_id[-3:]
    decode_cases.append({"ids": mixed, "decoded": tokenizer.decode(mixed, skip_special_tokens=False),
                         "decoded_skipping_special": tokenizer.decode(mixed, skip_special_tokens=True)})
    reference: Dict[str, Any] = {"fixture": name, "vocab_size": size, "cases": cases, "decode_cases": decode_cases}
    try:
        from transformers import AutoTokenizer

        auto = AutoTokenizer.from_pretrained(str(directory))
        view: Dict[str, Any] = {"class": type(auto).__name__}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            view[key] = getattr(auto, key, None)
            view[key + "_id"] = getattr(auto, key + "_id", None)
        view["input_ids"] = [{"text": text, "ids": auto(text)["input_ids"]} for text in texts[:6]]
        reference["transformers"] = view
    except Exception:
        log_error(manifest, f"{name}: AutoTokenizer view")
    return reference


def hf_fixtures(fixtures: Path, work: Path, manifest: Dict[str, Any]) -> List[str]:
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors

    lines = corpus_lines(fixtures)
    texts = json.loads((fixtures / "texts.json").read_text())
    made: List[str] = []
    built: Dict[str, Any] = {}

    def fixture(name: str, build: Callable[[], Any], settings: Dict[str, Any]) -> None:
        try:
            tokenizer = build()
            built[name] = tokenizer
            directory = work / "tokenizers" / name
            save_model_directory(tokenizer, directory, settings, manifest, name)
            reference = reference_for(directory, texts, manifest, name)
            (directory / "reference.json").write_text(json.dumps(reference, ensure_ascii=True, indent=1) + "\n")
            made.append(name)
        except Exception:
            log_error(manifest, name)

    def gpt2() -> Any:
        tokenizer = train_byte_level(lines, ["<|endoftext|>"], pre_tokenizers.ByteLevel(add_prefix_space=False))
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        tokenizer.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True, normalized=False)])
        tokenizer.add_tokens([AddedToken("[END]", rstrip=True, normalized=False),
                              AddedToken("cat", single_word=True, normalized=True),
                              AddedToken("<tool>", normalized=True)])
        return tokenizer

    gpt2_settings = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                     "model_max_length": 1024}
    fixture("gpt2", gpt2, gpt2_settings)
    base = built.get("gpt2")
    if base is not None:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        variants = {
            "gpt2-prefix-space": {"pre_tokenizer": pre_tokenizers.ByteLevel(add_prefix_space=True)},
            "bytelevel-no-regex": {"pre_tokenizer": byte_level},
            "split-merged-with-previous": {"pre_tokenizer": pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r"[,.;:!?]"), behavior="merged_with_previous"), byte_level])},
            "split-merged-with-next": {"pre_tokenizer": pre_tokenizers.Sequence(
                [pre_tokenizers.Split(" ", behavior="merged_with_next"), byte_level])},
            "split-contiguous-inverted": {"pre_tokenizer": pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r"\p{L}+"), behavior="contiguous", invert=True), byte_level])},
            "split-removed": {"pre_tokenizer": pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r"\s+"), behavior="removed"), byte_level])},
            "split-isolated-string": {"pre_tokenizer": pre_tokenizers.Sequence(
                [pre_tokenizers.Split("the", behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)])},
            "digits": {"pre_tokenizer": pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])},
            "digits-grouped": {"pre_tokenizer": pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=False), byte_level])},
            "nfkc-lowercase": {"normalizer": normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])},
            "nfd-strip": {"normalizer": normalizers.Sequence([normalizers.NFD(), normalizers.Strip(left=True,
                                                                                                    right=True)])},
            "nfkd": {"normalizer": normalizers.NFKD()},
            "replace-regex": {"normalizer": normalizers.Replace(Regex(r"\s+"), " ")},
            "decoder-none": {"decoder": None},
        }
        for name, parts in variants.items():
            fixture(name, lambda parts=parts: replace_parts(base, **parts), gpt2_settings)

    def llama3() -> Any:
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>", "<|reserved_special_token_0|>"]
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                                use_regex=False)])
        tokenizer = with_model_options(train_byte_level(lines, specials, pre), ignore_merges=True)
        bos = tokenizer.token_to_id("<|begin_of_text|>")
        tokenizer.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                          pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                          special_tokens=[("<|begin_of_text|>", bos)])])
        return tokenizer

    fixture("llama3", llama3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                               "chat_template": CHAT_TEMPLATES["llama3"], "model_max_length": 8192})

    def qwen2() -> Any:
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tokenizer = train_byte_level(lines, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], pre,
                                     normalizer=normalizers.NFC())
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        return tokenizer

    fixture("qwen2", qwen2, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                             "chat_template": CHAT_TEMPLATES["qwen2"], "model_max_length": 32768})

    def llama2_legacy() -> Any:
        tokenizer = replace_parts(train_metaspace_with_byte_fallback(lines), pre_tokenizer=None)
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                               decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)])
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                                 special_tokens=[("<s>", 1)])
        return tokenizer

    llama2_settings = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                       "chat_template": CHAT_TEMPLATES["llama2"], "model_max_length": 4096}
    fixture("llama2-legacy", llama2_legacy, llama2_settings)
    legacy = built.get("llama2-legacy")
    if legacy is not None:
        metaspace_first = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        fixture("llama2-metaspace", lambda: replace_parts(legacy, normalizer=None, pre_tokenizer=metaspace_first),
                llama2_settings)
        fixture("mistral-metaspace-decoder", lambda: replace_parts(
            legacy, normalizer=None, pre_tokenizer=metaspace_first,
            decoder=decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(
                replacement="\u2581", prepend_scheme="first", split=False), decoders.Fuse()])),
            dict(llama2_settings, chat_template=CHAT_TEMPLATES["mistral"]))
        fixture("metaspace-split-always", lambda: replace_parts(
            legacy, normalizer=None,
            pre_tokenizer=pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
            decoder=decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(
                replacement="\u2581", prepend_scheme="always", split=True)])), llama2_settings)
        fixture("metaspace-never", lambda: replace_parts(
            legacy, normalizer=None,
            pre_tokenizer=pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True),
            decoder=decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(
                replacement="\u2581", prepend_scheme="never", split=True)])), llama2_settings)
        fixture("llama2-legacy-normalized-specials", lambda: with_added_tokens_flags(legacy, normalized=True),
                llama2_settings)
        fixture("llama2-unk-no-byte-fallback", lambda: with_model_options(legacy, byte_fallback=False),
                llama2_settings)
    return made


def convert_sentencepiece(fixtures: Path, work: Path, manifest: Dict[str, Any]) -> List[str]:
    """The SentencePiece model through transformers' converter, legacy and not: the tokenizer.json
    a Llama-2 or Mistral checkpoint ships."""
    model = fixtures / "sentencepiece" / "tokenizer.model"
    texts = json.loads((fixtures / "texts.json").read_text())
    made = []
    for legacy in (True, False):
        name = "spm-converted-legacy" if legacy else "spm-converted"
        directory = work / "tokenizers" / name
        try:
            import transformers

            directory.mkdir(parents=True, exist_ok=True)
            attempts = []
            tokenizer = None
            # What a user does with a checkpoint that ships only tokenizer.model (transformers 5
            # converts it on load), then the constructors transformers 4 had.
            source = work.parent / "spm-sources" / name
            source.mkdir(parents=True, exist_ok=True)
            (source / "tokenizer.model").write_bytes(model.read_bytes())
            (source / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "LlamaTokenizer", "legacy": legacy, "add_bos_token": True,
                 "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                 "model_max_length": 4096}))
            constructors = [
                ("AutoTokenizer.from_pretrained", lambda: transformers.AutoTokenizer.from_pretrained(
                    str(source), legacy=legacy, from_slow=True)),
                ("LlamaTokenizerFast(vocab_file)", lambda: transformers.LlamaTokenizerFast(
                    vocab_file=str(model), legacy=legacy, from_slow=True, add_bos_token=True, add_eos_token=False)),
                ("LlamaTokenizer(vocab_file)", lambda: transformers.LlamaTokenizer(
                    vocab_file=str(model), legacy=legacy, add_bos_token=True, add_eos_token=False)),
            ]
            for label, construct in constructors:
                try:
                    tokenizer = construct()
                    manifest.setdefault("spm_constructor", {})[name] = label
                    break
                except Exception:
                    attempts.append(f"{label}: {traceback.format_exc(limit=3)}")
            manifest.setdefault("spm_attempts", {})[name] = attempts
            if tokenizer is None:
                raise RuntimeError("no Llama tokenizer class converted the model:\n" + "\n".join(attempts))
            tokenizer.chat_template = CHAT_TEMPLATES["llama2"]
            tokenizer.save_pretrained(str(directory))
            if not (directory / "tokenizer.json").exists():
                from transformers.convert_slow_tokenizer import convert_slow_tokenizer

                convert_slow_tokenizer(tokenizer).save(str(directory / "tokenizer.json"))
            (directory / "tokenizer.model").unlink(missing_ok=True)
            manifest["saved_by"][name] = f"transformers {type(tokenizer).__name__}"
            reference = reference_for(directory, texts, manifest, name)
            (directory / "reference.json").write_text(json.dumps(reference, ensure_ascii=True, indent=1) + "\n")
            made.append(name)
        except Exception:
            log_error(manifest, name)
    return made


def render_chat_templates(work: Path, manifest: Dict[str, Any]) -> None:
    """Every known template over every conversation, with and without a generation prompt, by
    transformers' apply_chat_template and by plain jinja2 set up as transformers sets it up."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    specials = {"qwen2": (None, "<|im_end|>"), "chatml": ("<s>", "</s>"),
                "llama3": ("<|begin_of_text|>", "<|eot_id|>"), "llama2": ("<s>", "</s>"),
                "mistral-v0.1": ("<s>", "</s>"), "mistral": ("<s>", "</s>")}
    records = []
    for name, source in CHAT_TEMPLATES.items():
        bos, eos = specials[name]
        holder = None
        try:
            from tokenizers import Tokenizer, models
            from transformers import PreTrainedTokenizerFast

            kwargs = {"eos_token": eos}
            if bos is not None:
                kwargs["bos_token"] = bos
            holder = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), **kwargs)
            holder.chat_template = source
        except Exception:
            log_error(manifest, f"chat template {name}: transformers tokenizer")
        compiled = environment.from_string(source)
        for index, conversation in enumerate(CONVERSATIONS):
            for add_generation_prompt in (False, True):
                record: Dict[str, Any] = {"template": name, "bos_token": bos, "eos_token": eos,
                                          "conversation": index, "add_generation_prompt": add_generation_prompt}
                if holder is not None:
                    try:
                        record["rendered"] = holder.apply_chat_template(
                            copy.deepcopy(conversation), tokenize=False, add_generation_prompt=add_generation_prompt)
                    except Exception as error:
                        record["error"] = f"{type(error).__name__}: {error}"
                try:
                    record["rendered_jinja2"] = compiled.render(
                        messages=copy.deepcopy(conversation), add_generation_prompt=add_generation_prompt,
                        bos_token=bos or "", eos_token=eos)
                except Exception as error:
                    record["error_jinja2"] = f"{type(error).__name__}: {error}"
                records.append(record)
    document = {"templates": CHAT_TEMPLATES, "conversations": CONVERSATIONS, "renders": records}
    (work / "chat_templates.json").write_text(json.dumps(document, ensure_ascii=True, indent=1) + "\n")


def run_hf(fixtures: Path, out: Path) -> None:
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    manifest: Dict[str, Any] = {"errors": [], "saved_by": {}, "versions": {}}
    for module in ("tokenizers", "transformers", "sentencepiece", "jinja2"):
        try:
            manifest["versions"][module] = __import__(module).__version__
        except Exception:
            log_error(manifest, f"import {module}")
    made = []
    for step in (hf_fixtures, convert_sentencepiece):
        try:
            made += step(fixtures, work, manifest)
        except Exception:
            log_error(manifest, step.__name__)
    try:
        render_chat_templates(work, manifest)
    except Exception:
        log_error(manifest, "render_chat_templates")
    manifest["fixtures"] = made
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    with tarfile.open(out / "fixtures.tar.gz", "w:gz") as archive:
        archive.add(str(work), arcname="fixtures")
    print(json.dumps({"fixtures": made, "errors": len(manifest["errors"]), "versions": manifest["versions"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    spm = sub.add_parser("sentencepiece", help="train the SentencePiece fixture here")
    spm.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/tokenizer/fixtures")
    hf = sub.add_parser("hf", help="make the Hugging Face fixtures (needs tokenizers and transformers)")
    hf.add_argument("--fixtures", type=Path, required=True, help="holds corpus.txt, texts.json, sentencepiece/")
    hf.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "sentencepiece":
        make_sentencepiece(args.out)
    else:
        run_hf(args.fixtures, args.out)


if __name__ == "__main__":
    main()
