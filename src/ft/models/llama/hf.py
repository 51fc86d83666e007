"""The HF `config.json` / `generation_config.json` of a Llama (`LlamaForCausalLM`);
the weights need no conversion: our parameter names already are HF's."""

from __future__ import annotations

from typing import Any

import torch

from ft.dtypes import dtype_name
from ft.models.llama.model import LlamaConfig


def hf_config_dict(config: LlamaConfig, *, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """The `config.json` of HF's LlamaForCausalLM for `config` (weights stored as `dtype`)."""
    d = decoder_hf_config(config, architecture="LlamaForCausalLM", model_type="llama", dtype=dtype)
    d.pop("rope_scaling")
    d.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    s = config.rope_scaling
    if s is not None:
        # The 4.x spelling (`rope_scaling` + `rope_theta`): read by vLLM and by transformers 4.x and 5.x.
        d["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    return d


def hf_generation_config_dict(config: LlamaConfig) -> dict[str, Any]:
    d: dict[str, Any] = {"bos_token_id": config.bos_id, "eos_token_id": config.eos_id}
    if config.pad_id is not None:
        d["pad_token_id"] = config.pad_id
    return d


# ---------------------------------------------------------------------------------
# Shared by the families built on the Llama modules (Qwen2, Qwen3, Mistral): the
# config.json keys they have in common, written and read the same way.


def decoder_hf_config(config: Any, *, architecture: str, model_type: str, dtype: torch.dtype) -> dict[str, Any]:
    """The `config.json` keys every Llama-like HF decoder has (no RoPE scaling, no bias flags)."""
    d: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "initializer_range": config.init_std,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": config.bos_id,
        "eos_token_id": config.eos_id,
        "torch_dtype": dtype_name(dtype),
    }
    if config.pad_id is not None:
        d["pad_token_id"] = config.pad_id
    return d


def decoder_fields_from_hf(d: dict, *, source: str, family: str) -> dict[str, Any]:
    """The config fields of a Llama-like family read from an HF `config.json` (KeyError
    for a missing required key); CheckpointError for RoPE scaling, which these families
    do not implement."""
    from ft.errors import CheckpointError

    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported by ft's {family} (only default)")
    n_heads = int(d["num_attention_heads"])
    head_dim = d.get("head_dim")
    eos = d.get("eos_token_id")
    return dict(
        vocab_size=int(d["vocab_size"]),
        dim=int(d["hidden_size"]),
        n_layers=int(d["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim) if head_dim is not None else int(d["hidden_size"]) // n_heads,
        ffn_dim=int(d["intermediate_size"]),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(d.get("rope_theta", rope.get("rope_theta", 10_000.0))),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_seq_len=int(d.get("max_position_embeddings", 32768)),
        bos_id=d.get("bos_token_id"),
        eos_id=eos if eos is not None else 0,
        pad_id=d.get("pad_token_id"),
        init_std=float(d.get("initializer_range", 0.02)),
    )
