"""The Qwen3 family bundle and its HF interop: `config.json` of `Qwen3ForCausalLM`
written and read. The weights need no conversion: the parameter names are HF's."""

from __future__ import annotations

from typing import Any

import torch

from ft.errors import CheckpointError
from ft.models.family_bundle import ModelFamily
from ft.models.llama.family import llama_flops_per_token, llama_tp_plan
from ft.models.llama.hf import decoder_fields_from_hf, decoder_hf_config, hf_generation_config_dict
from ft.models.llama.model import num_parameters
from ft.models.qwen3.model import QWEN3_ARCHS, Qwen3, Qwen3Config, update_qwen3_config


def qwen3_hf_config(config: Qwen3Config, *, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    d = decoder_hf_config(config, architecture="Qwen3ForCausalLM", model_type="qwen3", dtype=dtype)
    d.update(attention_bias=False, use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers)
    return d


def qwen3_config_from_hf(d: dict, *, source: str = "config.json") -> Qwen3Config:
    if d.get("model_type") != "qwen3":
        raise CheckpointError(f"{source}: model_type is {d.get('model_type')!r}, expected 'qwen3'")
    for flag in ("attention_bias", "use_sliding_window"):
        if d.get(flag):
            raise CheckpointError(f"{source}: {flag}=true is not supported by ft's Qwen3")
    try:
        return Qwen3Config(**decoder_fields_from_hf(d, source=source, family="Qwen3"))
    except KeyError as error:
        raise CheckpointError(f"{source}: missing key {error.args[0]!r}") from None


QWEN3_FAMILY = ModelFamily(
    name="qwen3",
    config_class=Qwen3Config,
    model_class=Qwen3,
    archs=QWEN3_ARCHS,
    update_config=update_qwen3_config,
    hf_model_types=("qwen3",),
    config_from_hf=qwen3_config_from_hf,
    hf_config=qwen3_hf_config,
    hf_generation_config=hf_generation_config_dict,
    # The same module names; q_norm / k_norm act on each local head, so they stay replicated.
    tp_plan=llama_tp_plan,
    flops_per_token=llama_flops_per_token,
    num_parameters=num_parameters,
    default_tokenizer_family="qwen",
    chat_template="qwen3",
)
