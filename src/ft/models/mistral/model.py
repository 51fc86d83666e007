"""The native Mistral family: `MistralConfig`, the named archs in `MISTRAL_ARCHS`, and
the `Mistral` module.

Mistral 7B v0.3 is a Llama with GQA, RoPE theta 1e6 and a 32768-token SentencePiece
vocabulary; HF's config carries an explicit `head_dim` and a `sliding_window` (null
since v0.2: full attention, which is all ft implements). It is built from the Llama
modules (`ft.models.llama.model`), so parameter names are HF `MistralForCausalLM`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from ft.errors import ConfigError
from ft.models.llama.model import Llama, check_config_keys
from ft.registry import Registry


@dataclass(kw_only=True, frozen=True)
class MistralConfig:
    """Sizes and settings of one Mistral model (`ft.models.mistral.family` maps them to HF's)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int = 128
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    tie_embeddings: bool = False
    max_seq_len: int = 32768
    bos_id: int | None = 1
    eos_id: int | list[int] = 2
    pad_id: int | None = None
    init_std: float = 0.02

    attention_bias: ClassVar[bool] = False
    qk_norm: ClassVar[bool] = False
    rope_scaling: ClassVar[None] = None

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"Mistral n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"Mistral head_dim={self.head_dim} must be even for RoPE")

    @property
    def eos_ids(self) -> list[int]:
        return [self.eos_id] if isinstance(self.eos_id, int) else list(self.eos_id)


class Mistral(Llama):
    """A Mistral causal LM with HF `MistralForCausalLM` parameter names (see `ft.models.llama.model.Llama`)."""

    def __init__(self, config: MistralConfig) -> None:
        super().__init__(config)  # type: ignore[arg-type]


def update_mistral_config(
    config: MistralConfig, overrides: Mapping[str, Any], *, source: str = "model_config"
) -> MistralConfig:
    """`config` with `overrides` applied; unknown keys raise ConfigError naming the closest field."""
    check_config_keys(config, overrides, source=source, family="Mistral")
    return dataclasses.replace(config, **overrides)


MISTRAL_ARCHS: Registry[MistralConfig] = Registry("Mistral arch")


def _register_archs() -> None:
    v0_3 = MistralConfig(vocab_size=32768, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336)
    MISTRAL_ARCHS.register("mistral_7b_v0_3", v0_3)
    MISTRAL_ARCHS.register("mistral_7b_v0_3_instruct", v0_3)  # the same config.json

    # Debug size for tests: GQA, head_dim != dim / n_heads.
    MISTRAL_ARCHS.register("mistral_debug", MistralConfig(
        vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, ffn_dim=160, max_seq_len=256,
    ))


_register_archs()

__all__ = ["MISTRAL_ARCHS", "Mistral", "MistralConfig", "update_mistral_config"]
