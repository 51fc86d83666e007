"""Looking up model families: `family_of(config)`, `get_family(name)`,
`find_arch(name)`, `family_for_hf_config(config_json)` and the helpers built on them.

A family is a folder under `ft/models/` (config class, model, checkpoint readers,
HF config conversion) that defines a `ModelFamily` bundle (`ft.models.family_bundle`)
plus one `register_family(...)` line in `ft/models/families.py`. Code outside the
folder — recipes, generation, export, benchmarks — reaches a family only through
these lookups.

What a family's model must look like (the HF layout every generic piece relies on):
- `model.config`: a frozen dataclass with at least `vocab_size`, `dim`, `n_layers`,
  `n_heads`, `n_kv_heads`, `head_dim`, `ffn_dim`, `max_seq_len`, `tie_embeddings`,
  `bos_id`, `eos_ids`, `pad_id`;
- `model.model.embed_tokens`, `model.model.layers` (the decoder blocks: the unit of
  activation checkpointing, compile and FSDP), `model.lm_head`;
- `forward(tokens_BT, *, positions_BT, document_ids_BT, kv_cache, return_hidden)`;
- `tie_weights()`, `reset_buffers()`, `init_weights(seed)`, and `to_empty(device=)`
  that re-ties shared weights.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

import ft.models.families  # noqa: F401  (registers the families ft ships)
from ft.errors import CheckpointError, ConfigError
from ft.models.family_bundle import FAMILIES, ModelFamily, register_family  # noqa: F401  (re-exported)
from ft.registry import Registry


def get_family(name: str, *, key: str | None = "model_family") -> ModelFamily:
    return FAMILIES.get(name, key=key)


def all_families() -> list[ModelFamily]:
    return [family for _, family in FAMILIES.items()]


def family_of(config_or_model: Any) -> ModelFamily:
    """The family of a config (or of a model, through `model.config`)."""
    config = getattr(config_or_model, "config", config_or_model)
    for family in all_families():
        if type(config) is family.config_class:
            return family
    raise ConfigError(f"no registered model family has config class {type(config).__name__}")


def find_arch(name: str) -> tuple[ModelFamily, Any]:
    """(family, config) of an arch name of any family; ConfigError listing them all on a miss."""
    for family in all_families():
        if name in family.archs:
            return family, family.archs.get(name)
    every = Registry("model arch")
    for family in all_families():
        for arch, config in family.archs.items():
            every.register(arch, config)
    raise ConfigError(every.unknown_message(name))


def family_for_hf_config(config_json: Mapping[str, Any], *, source: str = "config.json") -> ModelFamily:
    """The family that reads an HF `config.json` (by its `model_type`)."""
    model_type = config_json.get("model_type")
    families = all_families()
    for family in families:
        if model_type in family.hf_model_types:
            return family
    known = sorted(t for f in families for t in f.hf_model_types)
    raise CheckpointError(f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(known)}")


def meta_layout_family() -> ModelFamily:
    """The family that reads Meta `params.json` checkpoints (the one with a Meta reader)."""
    families = [f for f in all_families() if f.config_from_meta is not None]
    if len(families) != 1:
        raise CheckpointError(
            "cannot tell which model family a Meta params.json belongs to; name the model in a card (model_family)"
        )
    return families[0]


def parameter_count(config: Any, *, include_embeddings: bool = True) -> int:
    return family_of(config).num_parameters(config, include_embeddings=include_embeddings)


def model_flops_per_token(config: Any, seq_len: int) -> int:
    """Training FLOPs per token of `config`'s family at `seq_len` (for MFU)."""
    return family_of(config).flops_per_token(config, seq_len)


def build_meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        model = family_of(config).build(config)
    return model.to(dtype)  # free on meta
