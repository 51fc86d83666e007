"""The native Qwen3 dense family: `Qwen3Config`, the named archs in `QWEN3_ARCHS`,
and the `Qwen3` module.

A Qwen3 is a Llama with a per-head RMSNorm on queries and keys before RoPE (`q_norm`,
`k_norm`), no q/k/v bias, and a `head_dim` of its own (128 for every size, not
dim / n_heads); the small sizes tie the embeddings. It is built from the Llama
modules (`ft.models.llama.model`), which read `qk_norm` and `head_dim` from the
config, so parameter names are HF `Qwen3ForCausalLM`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from ft.errors import ConfigError
from ft.models.llama.model import Llama, check_config_keys
from ft.registry import Registry


@dataclass(kw_only=True, frozen=True)
class Qwen3Config:
    """Sizes and settings of one Qwen3 dense model (`ft.models.qwen3.family` maps them to HF's)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int = 128
    ffn_dim: int
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_embeddings: bool = False
    max_seq_len: int = 40960
    bos_id: int | None = 151643
    eos_id: int | list[int] = 151645
    pad_id: int | None = None
    init_std: float = 0.02

    attention_bias: ClassVar[bool] = False
    qk_norm: ClassVar[bool] = True
    rope_scaling: ClassVar[None] = None  # YaRN for long contexts is not implemented

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"Qwen3 n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"Qwen3 head_dim={self.head_dim} must be even for RoPE")

    @property
    def eos_ids(self) -> list[int]:
        return [self.eos_id] if isinstance(self.eos_id, int) else list(self.eos_id)


class Qwen3(Llama):
    """A Qwen3 causal LM with HF `Qwen3ForCausalLM` parameter names (see `ft.models.llama.model.Llama`)."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__(config)  # type: ignore[arg-type]


def update_qwen3_config(config: Qwen3Config, overrides: Mapping[str, Any], *, source: str = "model_config") -> Qwen3Config:
    """`config` with `overrides` applied; unknown keys raise ConfigError naming the closest field."""
    check_config_keys(config, overrides, source=source, family="Qwen3")
    return dataclasses.replace(config, **overrides)


QWEN3_ARCHS: Registry[Qwen3Config] = Registry("Qwen3 arch")

ENDOFTEXT_ID, IM_END_ID = 151643, 151645


def _register_archs() -> None:
    def arch(name: str, *, base: bool = True, **fields: Any) -> None:
        """The post-trained (thinking / instruct) arch `name` and, where one was
        published, its `_base` variant (a shorter context, stops on <|endoftext|>)."""
        post_trained = Qwen3Config(vocab_size=151936, **fields)
        QWEN3_ARCHS.register(name, post_trained)
        if base:
            QWEN3_ARCHS.register(f"{name}_base", dataclasses.replace(post_trained, max_seq_len=32768, eos_id=ENDOFTEXT_ID))

    arch("qwen3_0_6b", dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, ffn_dim=3072, tie_embeddings=True)
    arch("qwen3_1_7b", dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, ffn_dim=6144, tie_embeddings=True)
    arch("qwen3_4b", dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, ffn_dim=9728, tie_embeddings=True)
    arch("qwen3_8b", dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, ffn_dim=12288)
    arch("qwen3_14b", dim=5120, n_layers=40, n_heads=40, n_kv_heads=8, ffn_dim=17408)
    arch("qwen3_32b", dim=5120, n_layers=64, n_heads=64, n_kv_heads=8, ffn_dim=25600, base=False)

    # Debug sizes for tests: q/k norm, head_dim != dim / n_heads, GQA, tied and untied.
    debug = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, ffn_dim=160,
                 max_seq_len=256, bos_id=1, eos_id=2)
    QWEN3_ARCHS.register("qwen3_debug", Qwen3Config(**debug))
    QWEN3_ARCHS.register("qwen3_debug_tied", Qwen3Config(tie_embeddings=True, **debug))


_register_archs()

__all__ = ["QWEN3_ARCHS", "Qwen3", "Qwen3Config", "update_qwen3_config"]
