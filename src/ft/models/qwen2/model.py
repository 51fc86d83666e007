"""The native Qwen2 / Qwen2.5 family: `Qwen2Config`, the named archs in `QWEN2_ARCHS`,
and the `Qwen2` module.

A Qwen2 is a Llama with a bias on the query, key and value projections (not on the
output projection), RoPE theta 1e6 and RMSNorm eps 1e-6; the small sizes tie the
embeddings. It is built from the Llama modules (`ft.models.llama.model`), which read
`attention_bias` from the config, so parameter names are HF `Qwen2ForCausalLM`'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from ft.errors import ConfigError
from ft.models.llama.model import Llama, check_config_keys
from ft.registry import Registry


@dataclass(kw_only=True, frozen=True)
class Qwen2Config:
    """Sizes and settings of one Qwen2 / Qwen2.5 model (`ft.models.qwen2.family` maps them to HF's)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_embeddings: bool = False
    max_seq_len: int = 32768
    bos_id: int | None = 151643
    eos_id: int | list[int] = 151643
    pad_id: int | None = None
    init_std: float = 0.02

    attention_bias: ClassVar[bool] = True
    qk_norm: ClassVar[bool] = False
    rope_scaling: ClassVar[None] = None  # YaRN for long contexts is not implemented

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"Qwen2 dim={self.dim} is not a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"Qwen2 n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"Qwen2 head_dim={self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def eos_ids(self) -> list[int]:
        return [self.eos_id] if isinstance(self.eos_id, int) else list(self.eos_id)


class Qwen2(Llama):
    """A Qwen2 causal LM with HF `Qwen2ForCausalLM` parameter names (see `ft.models.llama.model.Llama`)."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__(config)  # type: ignore[arg-type]


def update_qwen2_config(config: Qwen2Config, overrides: Mapping[str, Any], *, source: str = "model_config") -> Qwen2Config:
    """`config` with `overrides` applied; unknown keys raise ConfigError naming the closest field."""
    check_config_keys(config, overrides, source=source, family="Qwen2")
    return dataclasses.replace(config, **overrides)


QWEN2_ARCHS: Registry[Qwen2Config] = Registry("Qwen2 arch")

# Qwen2.5 base token ids: <|endoftext|> begins and ends documents; instruct models end
# a turn with <|im_end|>.
ENDOFTEXT_ID, IM_END_ID = 151643, 151645


def _register_archs() -> None:
    def arch(name: str, *, instruct_max_seq_len: int = 32768, instruct_norm_eps: float | None = None,
             **fields: Any) -> None:
        """A base arch and its `_instruct` variant, which differ in their stop token and,
        for some sizes, in max_position_embeddings and rms_norm_eps (as their config.json files do)."""
        base = Qwen2Config(**fields)
        QWEN2_ARCHS.register(name, base)
        QWEN2_ARCHS.register(f"{name}_instruct", dataclasses.replace(
            base, eos_id=IM_END_ID, max_seq_len=instruct_max_seq_len,
            norm_eps=base.norm_eps if instruct_norm_eps is None else instruct_norm_eps,
        ))

    small = dict(vocab_size=151936, tie_embeddings=True)
    large = dict(vocab_size=152064)
    arch("qwen2_5_0_5b", dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864, **small)
    arch("qwen2_5_1_5b", dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, ffn_dim=8960, max_seq_len=131072, **small)
    arch("qwen2_5_3b", dim=2048, n_layers=36, n_heads=16, n_kv_heads=2, ffn_dim=11008, **small)
    arch("qwen2_5_7b", dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_dim=18944, max_seq_len=131072, **large)
    long_base = dict(large, max_seq_len=131072, norm_eps=1e-5, instruct_norm_eps=1e-6)
    arch("qwen2_5_14b", dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, ffn_dim=13824, **long_base)
    arch("qwen2_5_32b", dim=5120, n_layers=64, n_heads=40, n_kv_heads=8, ffn_dim=27648, **long_base)
    arch("qwen2_5_72b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=29568, **long_base)

    # Debug sizes for tests: GQA with q/k/v bias, tied and untied.
    debug = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=256,
                 bos_id=1, eos_id=2)
    QWEN2_ARCHS.register("qwen2_debug", Qwen2Config(**debug))
    QWEN2_ARCHS.register("qwen2_debug_tied", Qwen2Config(tie_embeddings=True, **debug))


_register_archs()

__all__ = ["QWEN2_ARCHS", "Qwen2", "Qwen2Config", "update_qwen2_config"]
