"""`ModelFamily`: everything ft needs to know about one model family, in one bundle.

A family is a folder under `ft/models/` (config class, model, checkpoint readers,
HF config conversion) plus one `register_family(...)` line in
`ft/models/families.py`. Code outside the folder — recipes, generation, export,
benchmarks — reaches a family only through this bundle: `family_of(config)`,
`get_family(name)`, `find_arch(name)`, `family_for_hf_config(config_json)`.

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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

import torch
from torch import Tensor, nn

from ft.errors import CheckpointError, ConfigError
from ft.registry import Registry


class KVCache(Protocol):
    """What a family's attention needs from a decoding cache (`ft.generation.StaticKVCache`).

    Per layer, `update` stores the new keys/values [B, K, T, H] and returns the keys
    and values to attend over; `attention_mask(T)` is the [B, 1, T, S] boolean mask
    of the T new queries over them; `advance(T)` runs once after all layers.
    """

    def update(self, layer: int, k_BKTH: Tensor, v_BKTH: Tensor) -> tuple[Tensor, Tensor]: ...

    def attention_mask(self, num_new: int) -> Tensor: ...

    def advance(self, num_new: int) -> None: ...


@dataclass(frozen=True, kw_only=True)
class ModelFamily:
    """One model family. Functions take the family's config dataclass."""

    name: str
    config_class: type
    """The family's config dataclass; `family_of(config)` looks the family up by it."""
    model_class: Callable[[Any], nn.Module]
    """Builds the model from a config (called under `torch.device("meta")`)."""
    archs: Registry
    """Named configs (e.g. "llama3_2_1b"); arch names are unique over all families."""
    update_config: Callable[..., Any]
    """`update_config(config, overrides, source=...)`: a card's `model_config` applied, unknown keys an error."""
    hf_model_types: tuple[str, ...]
    """`model_type` values of HF `config.json` files this family reads."""
    config_from_hf: Callable[..., Any]
    """`config_from_hf(config_json_dict, source=...)`."""
    hf_config: Callable[..., dict[str, Any]]
    """`hf_config(config, dtype=...)`: the HF `config.json` written on export."""
    hf_generation_config: Callable[[Any], dict[str, Any]]
    tp_plan: Callable[[bool], dict[str, Any]]
    """`tp_plan(loss_parallel)`: module name (wildcards allowed) -> ParallelStyle."""
    flops_per_token: Callable[[Any, int], int]
    """Training FLOPs per token (forward + backward) at a sequence length, for MFU."""
    num_parameters: Callable[..., int]
    """`num_parameters(config, include_embeddings=True)`."""
    default_tokenizer_family: str
    """The tokenizer family cards of this model family use when they name none."""
    chat_template: str | None = None
    """The family's chat template name (see `ft.tokenizers.chat`), if it has one."""
    config_from_meta: Callable[..., Any] | None = None
    """`config_from_meta(params_json_dict, source=...)` for families with a Meta layout."""
    iter_meta_state_dict: Callable[[Path, Any], Iterator[tuple[str, Tensor, Path]]] | None = None
    """(HF name, tensor, file) of a Meta `consolidated.NN.pth` checkpoint, converted."""
    hf_name_map: Mapping[str, str] = field(default_factory=dict)
    """Module-name renames from ft to HF; empty when the model already uses HF names."""

    def build(self, config: Any) -> nn.Module:
        return self.model_class(config)

    def get_arch(self, name: str) -> Any:
        return self.archs.get(name, key="model_arch")


FAMILIES: Registry[ModelFamily] = Registry("model family")


def register_family(family: ModelFamily) -> ModelFamily:
    """Add `family`; its archs must not reuse another family's arch names."""
    for other in FAMILIES.items():
        clash = set(family.archs.names()) & set(other[1].archs.names())
        if clash:
            raise ValueError(f"family {family.name!r} reuses arch names of family {other[0]!r}: {sorted(clash)}")
    return FAMILIES.register(family.name, family)


def _ensure_registered() -> None:
    # The built-in families register on first use, so this module (imported by every
    # family) never imports a family itself.
    import ft.models.families  # noqa: F401


def get_family(name: str, *, key: str | None = "model_family") -> ModelFamily:
    _ensure_registered()
    return FAMILIES.get(name, key=key)


def all_families() -> list[ModelFamily]:
    _ensure_registered()
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
