"""The `lora` config section and its checks against a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ft.errors import ConfigError

# The projections of every registered family's blocks, named as in the HF layout.
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

TRAINED_EMBEDDINGS_ON_HOST = (
    "config keys 'lora.embeddings_on_host' and 'lora.train_embeddings' do not combine: a trained embedding table "
    "needs its gradients on the GPU; use lora.train_embeddings=false, or lora.embeddings_on_host=false to train "
    "the embeddings")


@dataclass(kw_only=True)
class LoraConfig:
    enabled: bool = False
    """Train low-rank adapters on a frozen base instead of every weight."""
    rank: int = 16
    alpha: float = 32.0
    """The adapter output is scaled by alpha / rank (PEFT's `lora_alpha`)."""
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    """Names of the linear layers inside each block that get adapters (HF names: q_proj, gate_proj, ...)."""
    train_embeddings: bool = False
    """Also train the token embedding and output projection (saved as PEFT `modules_to_save`)."""
    base_quantization: Literal["none", "nf4"] = "none"
    """`nf4` (QLoRA): keep the frozen base linears in NF4 (torchao) and compute in `dtype`."""
    export_merged: bool = False
    """At every checkpoint also write the base with the adapters merged in (`step_N/merged/`)."""
    embeddings_on_host: bool = False
    """Keep the frozen input embedding table in host memory and send only the looked-up rows to the GPU (one
    process, untied embeddings, not with train_embeddings). Saves the table's GPU memory (0.98 GiB for Llama 3.1
    8B) for one small synchronization per forward; the table is pinned when CUDA is available."""

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def check_lora_config(config: LoraConfig, *, key: str = "lora") -> None:
    """ConfigError for settings that cannot work whatever the model."""
    if config.embeddings_on_host and not config.enabled:
        raise ConfigError(f"config key '{key}.embeddings_on_host' keeps LoRA's frozen input embedding on the host, "
                          f"but {key}.enabled=false trains every weight, the embedding too; use {key}.enabled=true "
                          f"or {key}.embeddings_on_host=false")
    if not config.enabled:
        return
    if config.embeddings_on_host and config.train_embeddings:
        raise ConfigError(TRAINED_EMBEDDINGS_ON_HOST)
    if config.rank < 1:
        raise ConfigError(f"config key '{key}.rank' must be at least 1, got {config.rank}")
    if not 0.0 <= config.dropout < 1.0:
        raise ConfigError(f"config key '{key}.dropout' must be in [0, 1), got {config.dropout}")
    if not config.target_modules:
        raise ConfigError(f"config key '{key}.target_modules' is empty; name at least one of "
                          f"{', '.join(DEFAULT_TARGET_MODULES)}")


def check_embeddings_on_host_layout(config: LoraConfig, **sizes: int) -> None:
    """ConfigError when `lora.embeddings_on_host` meets more than one process (`sizes`: parallel sizes by
    name): FSDP, tensor parallelism and pipeline stages shard the table or place it on the GPUs."""
    if not (config.enabled and config.embeddings_on_host):
        return
    over = _above_one(sizes)
    if over:
        raise ConfigError(f"config key 'lora.embeddings_on_host' runs on one process, but this run has "
                          f"{', '.join(over)} (FSDP, tensor parallelism and pipeline stages shard the table or place "
                          "it on the GPUs); run one process, or use lora.embeddings_on_host=false")


def check_float8_base_layout(config: LoraConfig, fp8: str, **sizes: int) -> None:
    """ConfigError for a float8 frozen base (`fp8` with LoRA) that cannot work: on NF4, or sharded."""
    if config.base_quantization != "none":
        raise ConfigError(f"config key 'fp8' ({fp8}) casts LoRA's frozen base to float8, and "
                          f"lora.base_quantization={config.base_quantization} quantizes it too; choose one: "
                          "fp8=none for QLoRA, or lora.base_quantization=none for a float8 base")
    over = _above_one(sizes)
    if over:
        raise ConfigError(f"config key 'fp8' ({fp8}) with lora.enabled=true runs on one process (float8 base weights "
                          f"are not sharded or broadcast), but this run has {', '.join(over)}; run one process, or "
                          "use fp8=none")


def _above_one(sizes: dict[str, int]) -> list[str]:
    """"name=size" for each parallel size above 1."""
    return [f"{name}={size}" for name, size in sizes.items() if size > 1]
