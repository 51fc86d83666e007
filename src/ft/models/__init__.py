"""Building and loading models: `build_model` (an arch on any device, meta by
default), `load_model` (a card name or a checkpoint path -> a `Llama` with weights)
and `model_flops_per_token` (for MFU).

Llama is the only family; a card's `model_family` must say "llama" when present.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ft.errors import AssetError, CheckpointError, ConfigError
from ft.models.llama.checkpoint import checkpoint_dtype, load_checkpoint, read_checkpoint_config
from ft.models.llama.model import (
    LLAMA_ARCHS,
    Llama,
    LlamaConfig,
    get_llama_arch,
    num_parameters,
    update_llama_config,
)

log = logging.getLogger("ft")

SUPPORTED_FAMILIES = ("llama",)


def build_model(
    arch_or_config: str | LlamaConfig,
    *,
    device: torch.device | str = "meta",
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
) -> Llama:
    """A `Llama` of the named arch (or config).

    On "meta" (the default) nothing is allocated: parallelize it, then `to_empty`,
    `reset_buffers()` and load or `init_weights()`. On a real device the weights are
    allocated once, directly in `dtype`, and initialised (`seed` makes it repeatable).
    """
    config = get_llama_arch(arch_or_config) if isinstance(arch_or_config, str) else arch_or_config
    with torch.device("meta"):
        model = Llama(config)
    model.to(dtype)  # free on meta; the RoPE table stays float32
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        model.reset_buffers()
        model.init_weights(seed)
    return model


def model_config_from_card(card) -> LlamaConfig | None:
    """The config a model card names (`model_arch` + `model_config` overrides), or None
    when the card leaves it to the checkpoint's config.json / params.json."""
    family = card.get("model_family", "llama")
    if family not in SUPPORTED_FAMILIES:
        raise AssetError(f"card {card.name!r}: model_family {family!r} is not supported; known: {', '.join(SUPPORTED_FAMILIES)}")
    arch = card.get("model_arch")
    overrides = card.get("model_config") or {}
    if arch is None:
        if overrides:
            raise AssetError(f"card {card.name!r} has model_config but no model_arch to apply it to")
        return None
    try:
        config = get_llama_arch(arch)
    except ConfigError as error:
        raise AssetError(f"card {card.name!r}: {error}") from None
    if not isinstance(overrides, dict):
        raise AssetError(f"card {card.name!r}: model_config must be a mapping of Llama config keys, got {overrides!r}")
    return update_llama_config(config, overrides, source=f"card {card.name!r} model_config")


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.startswith((".", "~")) or Path(name).exists()


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: its config and the checkpoint holding its weights."""

    description: str
    config: LlamaConfig
    checkpoint: Path | None  # None: the card names an arch but no weights
    card_name: str | None = None


def resolve_model(name_or_path: str | os.PathLike) -> ModelSource:
    """A model card name or a checkpoint path -> its config and checkpoint, without loading.

    Paths: an HF safetensors dir (config from its config.json), a Meta dir or
    `consolidated.NN.pth` (config from params.json), or an ft step dir. A card's
    config comes from `model_arch` + `model_config`, else from its checkpoint.
    """
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(str(name_or_path)):
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise CheckpointError(f"model checkpoint {path} does not exist")
        return ModelSource(str(path), read_checkpoint_config(path), path)
    from ft.assets import load_card

    card = load_card(str(name_or_path))
    config = model_config_from_card(card)
    checkpoint = card.path("checkpoint") if card.get("checkpoint") is not None else None
    if config is None:
        if checkpoint is None:
            raise AssetError(f"card {card.name!r} names neither a model_arch nor a checkpoint")
        config = read_checkpoint_config(checkpoint)
    description = f"card {card.name!r}" + (f" ({checkpoint})" if checkpoint is not None else "")
    return ModelSource(description, config, checkpoint, card_name=card.name)


def require_checkpoint(source: ModelSource) -> Path:
    """The checkpoint of `source`, or a clear error for a card that names only an arch."""
    if source.checkpoint is None:
        raise AssetError(
            f"{source.description} has no checkpoint to load weights from; add `checkpoint:` to the card, "
            f"overlay it with '{source.card_name}@user', or use build_model() for a randomly initialised model"
        )
    return source.checkpoint


def load_model(
    name_or_path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Llama:
    """A `Llama` with weights, from a model card name or a checkpoint path (see
    `resolve_model`). `device` defaults to CPU, `dtype` to the dtype the checkpoint is
    stored in. The model is built on meta and each tensor is read straight into its
    final storage.
    """
    source = resolve_model(name_or_path)
    path = require_checkpoint(source)
    if dtype is None:
        dtype = checkpoint_dtype(path)
    device = torch.device(device or "cpu")
    log.info("loading Llama from %s onto %s as %s", source.description, device, dtype)
    with torch.device("meta"):
        model = Llama(source.config)
    model.to(dtype)
    model.to_empty(device=device)
    model.reset_buffers()
    load_checkpoint(model, path)
    return model


def model_flops_per_token(config: LlamaConfig, seq_len: int) -> int:
    """Training FLOPs per token (torchtitan's count, forward + backward):
    6 x (non-embedding parameters + the output projection) + 12 x layers x heads x head_dim x seq_len.
    The output projection counts even when tied: its matmul is done all the same."""
    dense = num_parameters(config, include_embeddings=False) + config.vocab_size * config.dim
    return 6 * dense + 12 * config.n_layers * config.n_heads * config.head_dim * seq_len


__all__ = [
    "LLAMA_ARCHS",
    "Llama",
    "LlamaConfig",
    "ModelSource",
    "build_model",
    "get_llama_arch",
    "load_model",
    "model_config_from_card",
    "model_flops_per_token",
    "require_checkpoint",
    "resolve_model",
]
