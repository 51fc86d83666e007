"""The Qwen2 family bundle and its HF interop: `config.json` of `Qwen2ForCausalLM`
written and read. The weights need no conversion: the parameter names are HF's."""

from __future__ import annotations

from typing import Any

import torch

from ft.errors import CheckpointError
from ft.models.family_bundle import ModelFamily
from ft.models.llama.family import llama_flops_per_token, llama_tp_plan
from ft.models.llama.hf import decoder_fields_from_hf, decoder_hf_config, hf_generation_config_dict
from ft.models.llama.model import num_parameters
from ft.models.qwen2.model import QWEN2_ARCHS, Qwen2, Qwen2Config, update_qwen2_config


def qwen2_hf_config(config: Qwen2Config, *, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    d = decoder_hf_config(config, architecture="Qwen2ForCausalLM", model_type="qwen2", dtype=dtype)
    d.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers)
    return d


def qwen2_config_from_hf(d: dict, *, source: str = "config.json") -> Qwen2Config:
    if d.get("model_type") != "qwen2":
        raise CheckpointError(f"{source}: model_type is {d.get('model_type')!r}, expected 'qwen2'")
    if d.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported by ft's Qwen2")
    try:
        fields = decoder_fields_from_hf(d, source=source, family="Qwen2")
    except KeyError as error:
        raise CheckpointError(f"{source}: missing key {error.args[0]!r}") from None
    head_dim = fields.pop("head_dim")
    if head_dim != fields["dim"] // fields["n_heads"]:
        raise CheckpointError(f"{source}: head_dim={head_dim} != hidden_size / num_attention_heads; not supported")
    return Qwen2Config(**fields)


QWEN2_FAMILY = ModelFamily(
    name="qwen2",
    config_class=Qwen2Config,
    model_class=Qwen2,
    archs=QWEN2_ARCHS,
    update_config=update_qwen2_config,
    hf_model_types=("qwen2",),
    config_from_hf=qwen2_config_from_hf,
    hf_config=qwen2_hf_config,
    hf_generation_config=hf_generation_config_dict,
    tp_plan=llama_tp_plan,  # the same module names; biases shard with their columns
    flops_per_token=llama_flops_per_token,
    num_parameters=num_parameters,
    default_tokenizer_family="qwen",
    chat_template="chatml",
)
