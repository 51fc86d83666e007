"""The HF `config.json` / `generation_config.json` of a Llama (`LlamaForCausalLM`);
the weights need no conversion: our parameter names already are HF's."""

from __future__ import annotations

from typing import Any

import torch

from ft.models.hf_export import dtype_name
from ft.models.llama.model import LlamaConfig


def hf_config_dict(config: LlamaConfig, *, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """The `config.json` of HF's LlamaForCausalLM for `config` (weights stored as `dtype`)."""
    d: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": config.bos_id,
        "eos_token_id": config.eos_id,
        # transformers < 4.56 and vLLM read `torch_dtype`, newer transformers `dtype`.
        "torch_dtype": dtype_name(dtype),
    }
    if config.pad_id is not None:
        d["pad_token_id"] = config.pad_id
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
