"""`ModelFamily`: everything ft needs to know about one model family, in one bundle,
and `FAMILIES`, the registry of them. Family folders import this module only, so it
imports no family (the lookups that need every family registered are in
`ft.models.family`).

What a family's model must provide is listed in `ft.models.family`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

from torch import Tensor, nn

from ft.registry import Registry


class KVCache(Protocol):
    """What a family's attention needs from a decoding cache (`ft.generation.StaticKVCache`).

    Per layer, `update` stores the new keys/values [B, K, T, H] and returns the keys
    and values to attend over; `attention_mask(T)` is the [B, 1, T, S] boolean mask
    of the T new queries over them (or a mask object of `ft.models.attention_mask`
    asking for another attention kernel); `advance(T)` runs once after all layers.
    """

    def update(self, layer: int, k_BKTH: Tensor, v_BKTH: Tensor) -> tuple[Tensor, Tensor]: ...

    def attention_mask(self, num_new: int) -> Any: ...

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
