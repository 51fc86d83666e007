"""The one way a model comes to be, for every caller (recipes, generation,
benchmarks, `load_model`):

    build on meta -> parallelize -> materialize (`to_empty`) -> `reset_buffers`
    -> load a checkpoint or initialise

`create_model` runs that sequence; `resolve_model` turns a card name or a path into
the config and checkpoint to run it with; `load_model` is both for one process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ft.assets.resolve import is_explicit_path
from ft.errors import AssetError, CheckpointError, ConfigError
from ft.models.checkpoint import checkpoint_dtype, load_checkpoint, read_checkpoint_config
from ft.models.family import build_meta_model, find_arch, get_family
from ft.models.init_rng import full_tensor_random_init

log = logging.getLogger("ft")


def build_model(
    arch_or_config: Any,
    *,
    device: torch.device | str = "meta",
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
) -> nn.Module:
    """A model of the named arch (or config), of whichever family it belongs to.

    On "meta" (the default) nothing is allocated (see `create_model` for the rest of
    the path). On a real device the weights are allocated once, directly in `dtype`,
    and initialised (`seed` makes it repeatable).
    """
    config = find_arch(arch_or_config)[1] if isinstance(arch_or_config, str) else arch_or_config
    if torch.device(device).type == "meta":
        return build_meta_model(config, dtype)
    return create_model(config, device=device, dtype=dtype, seed=seed)


def create_model(
    config: Any,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    parallelize: Callable[[nn.Module], nn.Module] | None = None,
    checkpoint: Path | None = None,
    seed: int | None = None,
    initialize: bool = True,
) -> nn.Module:
    """Build `config`'s model on meta, `parallelize` it (e.g. a partial of
    `ft.models.parallelize.parallelize_model`), materialize it on `device` and give
    it weights: read from `checkpoint` (shard by shard: no rank ever holds the full
    model), else initialised with `seed`. `initialize=False` leaves the weights
    uninitialised, for a trainer about to load its own saved state.
    """
    model = build_meta_model(config, dtype)
    if parallelize is not None:
        model = parallelize(model)
    model.to_empty(device=device)
    model.reset_buffers()  # non-persistent buffers (RoPE tables) no checkpoint restores
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    elif initialize:
        with full_tensor_random_init():  # the same weights on any layout
            model.init_weights(seed)
    return model


def model_config_from_card(card) -> Any | None:
    """The config a model card names (`model_arch` + `model_config` overrides), or None
    when the card leaves it to the checkpoint's config.json / params.json."""
    family_name = card.get("model_family")
    family = None
    if family_name is not None:
        try:
            family = get_family(family_name)
        except ConfigError as error:
            raise AssetError(f"card {card.name!r}: {error}") from None
    arch = card.get("model_arch")
    overrides = card.get("model_config") or {}
    if arch is None:
        if overrides:
            raise AssetError(f"card {card.name!r} has model_config but no model_arch to apply it to")
        return None
    try:
        if family is None:
            family, config = find_arch(arch)
        else:
            config = family.get_arch(arch)
    except ConfigError as error:
        raise AssetError(f"card {card.name!r}: {error}") from None
    if not isinstance(overrides, dict):
        raise AssetError(f"card {card.name!r}: model_config must be a mapping of {family.name} config keys, got {overrides!r}")
    return family.update_config(config, overrides, source=f"card {card.name!r} model_config")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: its config and the checkpoint holding its weights."""

    description: str
    config: Any
    checkpoint: Path | None  # None: the card names an arch but no weights
    card_name: str | None = None
    adapter: Path | None = None  # a LoRA adapter directory to run on the base (`ft.lora.adapter_model`)


def resolve_model(name_or_path: str | os.PathLike) -> ModelSource:
    """A model card name or a checkpoint path -> its config and checkpoint, without loading.

    Paths: an HF safetensors dir (config from its config.json), a Meta dir or
    `consolidated.NN.pth` (config from params.json), or an ft step dir. A card's
    config comes from `model_arch` + `model_config`, else from its checkpoint.
    """
    from ft.assets import resolve_card_or_path

    try:
        card = resolve_card_or_path(name_or_path, what="model")
    except AssetError as error:
        if is_explicit_path(name_or_path):
            raise CheckpointError(f"model checkpoint {Path(name_or_path).expanduser()} does not exist") from None
        raise error from None
    if isinstance(card, Path):
        return ModelSource(str(card), read_checkpoint_config(card), card)
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
) -> nn.Module:
    """A model with weights, from a model card name or a checkpoint path (see
    `resolve_model`). `device` defaults to CPU, `dtype` to the dtype the checkpoint is
    stored in. Each tensor is read straight into its final storage.
    """
    source = resolve_model(name_or_path)
    path = require_checkpoint(source)
    if dtype is None:
        dtype = checkpoint_dtype(path)
    device = torch.device(device or "cpu")
    log.info("loading %s onto %s as %s", source.description, device, dtype)
    return create_model(source.config, device=device, dtype=dtype, checkpoint=path)
