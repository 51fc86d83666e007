"""A tiny Qwen-style tokenizer trained in the test: byte-level BPE `tokenizer.json`
with Qwen's pre-tokenizer and control tokens, plus a `tokenizer_config.json` as
Qwen's instruct repos ship it. Shared by the tokenizer, model and recipe tests."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Qwen2's pre-tokenizer pattern (from its tokenizer.json).
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "Hello world! How are you today? I'm fine, thanks.\n\n",
    "Numbers: 12345 and 3.14159, dates 2024-05-01.\n",
    "def main():\n    return {'key': [1, 2, 3]}\n",
    "Ünïcödé text: café, naïve, 東京, Ελληνικά, 😀.\n",
    "What is 2 + 2? The answer is 4.\n",
    "Tabs\tand  double  spaces   here.\r\n",
] * 20


def train_qwen_tokenizer(directory: Path, *, qwen3: bool = False, vocab_size: int = 500) -> Path:
    """Write tokenizer.json + tokenizer_config.json into `directory`; returns it.
    `qwen3` adds `<think>` / `</think>` as Qwen3 does (added, not special)."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(SPECIAL)
    if qwen3:
        tok.add_tokens(["<think>", "</think>"])
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory
