"""The Mistral family bundle and its HF interop: `config.json` of `MistralForCausalLM`
written and read. The weights need no conversion: the parameter names are HF's."""

from __future__ import annotations

from typing import Any

import torch

from ft.errors import CheckpointError
from ft.models.family_bundle import ModelFamily
from ft.models.llama.family import llama_flops_per_token, llama_tp_plan
from ft.models.llama.hf import decoder_fields_from_hf, decoder_hf_config, hf_generation_config_dict
from ft.models.llama.model import num_parameters
from ft.models.mistral.model import MISTRAL_ARCHS, Mistral, MistralConfig, update_mistral_config


def mistral_hf_config(config: MistralConfig, *, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    d = decoder_hf_config(config, architecture="MistralForCausalLM", model_type="mistral", dtype=dtype)
    d["sliding_window"] = None
    return d


def mistral_config_from_hf(d: dict, *, source: str = "config.json") -> MistralConfig:
    if d.get("model_type") != "mistral":
        raise CheckpointError(f"{source}: model_type is {d.get('model_type')!r}, expected 'mistral'")
    try:
        fields = decoder_fields_from_hf(d, source=source, family="Mistral")
    except KeyError as error:
        raise CheckpointError(f"{source}: missing key {error.args[0]!r}") from None
    window = d.get("sliding_window")
    if window is not None and int(window) < fields["max_seq_len"]:
        # Mistral 7B v0.1: a 4096-token window under a 32768-token context. Capping the
        # context at the window makes full attention exactly what the model computes.
        fields["max_seq_len"] = int(window)
    return MistralConfig(**fields)


MISTRAL_FAMILY = ModelFamily(
    name="mistral",
    config_class=MistralConfig,
    model_class=Mistral,
    archs=MISTRAL_ARCHS,
    update_config=update_mistral_config,
    hf_model_types=("mistral",),
    config_from_hf=mistral_config_from_hf,
    hf_config=mistral_hf_config,
    hf_generation_config=hf_generation_config_dict,
    tp_plan=llama_tp_plan,
    flops_per_token=llama_flops_per_token,
    num_parameters=num_parameters,
    default_tokenizer_family="mistral",
    chat_template="mistral",
)
