"""Helpers for the generation tests: a tiny random Llama (ft and HF), a small BPE
tokenizer.json, and a directory holding both (a checkpoint `ft lm generate` loads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ft.models import build_model
from ft.models.llama.model import LlamaConfig

TINY = dict(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=256, rope_theta=10_000.0)

CORPUS = [
    "Janet has 3 apples and buys 5 more. How many apples does she have? #### 8",
    "The answer is 42, of course; 1,234 people agreed and -7 did not.",
    "Question: what is 2 + 2? Answer: 4. Question: what is 10 - 3? Answer: 7.",
    "def add(a, b): return a + b  # hello world",
] * 4


class IdTokenizer:
    """Ids are their own text; stop on `stop_ids`."""

    def __init__(self, stop_ids=(2,)) -> None:
        self.stop_ids = list(stop_ids)

    def decode(self, ids) -> str:
        return " ".join(str(i) for i in ids)

    def encode_prompt(self, text: str) -> list[int]:
        return [1] + [int(x) for x in text.split()]


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    """A random ft Llama in float32 with randomized norm weights (so a mix-up shows)."""
    model = build_model(LlamaConfig(**{**TINY, **overrides}), device="cpu", seed=seed)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model.eval()


def random_prompts(lengths, vocab_size: int = 96, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def write_bpe_tokenizer(directory: Path) -> Path:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json) with <s>, </s>, <pad>."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    )
    return directory / "tokenizer.json"


def make_run_dir(root: Path, *, step: int = 3) -> Path:
    """ROOT/run/checkpoints/step_N holding a random HF Llama and its BPE tokenizer, as
    training writes it; returns ROOT/run. The vocabulary is padded to a multiple of 64
    (as real models do), so tensor parallel sizes up to 64 divide it."""
    transformers = pytest.importorskip("transformers")
    from ft.tokenizers import load_tokenizer

    step_dir = root / "run" / "checkpoints" / f"step_{step}"
    write_bpe_tokenizer(step_dir)
    vocab_size = -(-load_tokenizer(str(step_dir / "tokenizer.json")).vocab_size // 64) * 64
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(step_dir, safe_serialization=True)
    return root / "run"
