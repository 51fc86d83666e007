"""Llama checkpoints: HF `config.json` and Meta `params.json` to `LlamaConfig`, and
Meta `consolidated.NN.pth` shards converted to HF names and layout: shards are
concatenated along each weight's split dimension, keys renamed, and wq/wk permuted
from Meta's interleaved RoPE layout to rotate-half. Loading into a model is generic
(`ft.models.checkpoint`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from ft.errors import CheckpointError
from ft.models.checkpoint_files import IGNORED_KEY, meta_shard_files
from ft.models.llama.model import LlamaConfig, LlamaRopeScaling

def config_from_hf_dict(d: dict, *, source: str = "config.json") -> LlamaConfig:
    """LlamaConfig from an HF Llama config.json (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
    model_type = d.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"{source}: model_type is {model_type!r}, only 'llama' is supported")
    try:
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported (only default and llama3)")
        theta = d.get("rope_theta", rope.get("rope_theta", 10_000.0))
        scaling = None
        if rope_type == "llama3":
            scaling = LlamaRopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        n_heads = int(d["num_attention_heads"])
        dim = int(d["hidden_size"])
        head_dim = d.get("head_dim")
        if head_dim is not None and int(head_dim) != dim // n_heads:
            raise CheckpointError(f"{source}: head_dim={head_dim} != hidden_size / num_attention_heads; not supported")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise CheckpointError(f"{source}: {flag}=true is not supported by ft's Llama")
        return LlamaConfig(
            vocab_size=int(d["vocab_size"]),
            dim=dim,
            n_layers=int(d["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
            ffn_dim=int(d["intermediate_size"]),
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_seq_len=int(d.get("max_position_embeddings", 2048)),
            bos_id=d.get("bos_token_id", 1),
            eos_id=d.get("eos_token_id", 2),
            pad_id=d.get("pad_token_id"),
            init_std=float(d.get("initializer_range", 0.02)),
        )
    except KeyError as error:
        raise CheckpointError(f"{source}: missing key {error.args[0]!r}") from None


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward hidden size: 2/3 of 4*dim, scaled, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def config_from_meta_params(p: dict, *, source: str = "params.json") -> LlamaConfig:
    """LlamaConfig from Meta's params.json. Llama 2 files say vocab_size -1 (32000)."""
    try:
        dim, n_heads = int(p["dim"]), int(p["n_heads"])
        vocab = int(p.get("vocab_size", -1))
        llama3 = vocab == 128256 or float(p.get("rope_theta", 10_000.0)) == 500_000.0
        if vocab <= 0:
            vocab = 32000
        # Meta's params.json for 3.1/3.2 says only `use_scaled_rope`; the factor and the
        # tying live in Meta's code, by model size (3.2 1B/3B: factor 32, tied; else 8),
        # which is also how transformers' converter decides. An explicit key wins.
        small_llama3 = llama3 and dim in (2048, 3072)
        scaling = None
        if p.get("use_scaled_rope"):
            defaults = LlamaRopeScaling()
            scaling = LlamaRopeScaling(
                factor=float(p.get("rope_scaling_factor") or (32.0 if small_llama3 else 8.0)),
                low_freq_factor=float(p.get("low_freq_factor", defaults.low_freq_factor)),
                high_freq_factor=float(p.get("high_freq_factor", defaults.high_freq_factor)),
                original_max_position_embeddings=int(
                    p.get("original_max_position_embeddings", defaults.original_max_position_embeddings)
                ),
            )
        tie = p.get("tie_embeddings", small_llama3)
        return LlamaConfig(
            vocab_size=vocab,
            dim=dim,
            n_layers=int(p["n_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(p.get("n_kv_heads") or n_heads),
            ffn_dim=meta_ffn_dim(dim, int(p.get("multiple_of", 256)), p.get("ffn_dim_multiplier")),
            norm_eps=float(p.get("norm_eps", 1e-5)),
            rope_theta=float(p.get("rope_theta", 10_000.0)),
            rope_scaling=scaling,
            tie_embeddings=bool(tie),
            max_seq_len=131072 if scaling else (8192 if llama3 else 4096),
            bos_id=128000 if llama3 else 1,
            eos_id=128001 if llama3 else 2,
        )
    except KeyError as error:
        raise CheckpointError(f"{source}: missing key {error.args[0]!r}") from None


_META_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


_META_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


# Split dim of each model-parallel weight (fairscale / Meta's llama code): column-parallel
# layers split their output rows, row-parallel layers (wo, w2) their input columns.
_META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def meta_to_hf_key(key: str) -> str | None:
    """HF name of a Meta key; None for keys that hold no weights of ours."""
    if key in _META_TOP:
        return _META_TOP[key]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m and m.group(2) in _META_KEYS:
        return f"model.layers.{m.group(1)}.{_META_KEYS[m.group(2)]}"
    return None


def permute_meta_to_hf(w: Tensor, n_heads: int) -> Tensor:
    """Meta's interleaved RoPE pairs (x0,x1),(x2,x3)... -> HF's rotate-half halves, per head."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _merge_meta_shards(key: str, shards: list[Tensor], dim: int) -> Tensor:
    if len(shards) == 1:
        return shards[0]
    if shards[0].ndim == 1:  # norms are replicated on every rank
        return shards[0]
    leaf = key.split(".")[-2]
    if key == "tok_embeddings.weight":
        # Llama 2 split the embedding dim (ParallelEmbedding), Llama 3 the vocab (VocabParallelEmbedding).
        split = 1 if shards[0].shape[1] != dim else 0
    else:
        split = _META_SPLIT_DIM.get(leaf, 0)
    return torch.cat(shards, dim=split)


def iter_meta_state_dict(path: Path, config: LlamaConfig) -> Iterator[tuple[str, Tensor, Path]]:
    """(HF name, tensor, file) of a Meta checkpoint, converted key by key."""
    files = meta_shard_files(path)
    shards = []
    for file in files:
        try:
            shards.append(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
        except Exception as error:  # torch raises several types for a corrupt/foreign file
            raise CheckpointError(f"cannot read Meta checkpoint shard {file}: {error}") from None
    for key in shards[0]:
        name = meta_to_hf_key(key)
        if name is None:
            if IGNORED_KEY.search(key):
                continue
            raise CheckpointError(f"unexpected tensor {key!r} in {files[0]}: not a Llama weight")
        parts = []
        for file, shard in zip(files, shards):
            if key not in shard:
                raise CheckpointError(f"tensor {key!r} is in {files[0].name} but missing from {file}")
            parts.append(shard[key])
        tensor = _merge_meta_shards(key, parts, config.dim)
        if name.endswith("q_proj.weight"):
            tensor = permute_meta_to_hf(tensor, config.n_heads)
        elif name.endswith("k_proj.weight"):
            tensor = permute_meta_to_hf(tensor, config.n_kv_heads)
        yield name, tensor, files[0]

