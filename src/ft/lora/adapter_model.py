"""A base model with a saved LoRA adapter on it, for generation and for starting a new
LoRA run from an adapter.

An adapter directory (`adapter_config.json` + `adapter_model.safetensors`, a LoRA
run's `OUT/checkpoints/step_N` or one PEFT wrote) holds only the adapted tensors, so
it names its base in `base_model_name_or_path` (a card name or a checkpoint path).
`adapter_source` turns such a directory into the base's `ModelSource` with
`adapter` set; `create_model_with_adapter` builds the base through the one build
path with adapters injected before parallelization (so tensor parallelism shards
them like training does), loads the base, then the adapter. The adapters are kept
apart from the base weights (not merged), as PEFT runs them, so the logits are
those of base + adapter at the base's stored precision.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ft.errors import CheckpointError, ConfigError
from ft.lora.apply import _local_view, apply_lora, trainable_parameters
from ft.lora.config import LoraConfig
from ft.lora.peft_io import ADAPTER_CONFIG, load_adapter


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def recorded_base(adapter_dir: Path) -> str | None:
    """The adapter's `base_model_name_or_path` (None when it records none)."""
    file = adapter_dir / ADAPTER_CONFIG
    try:
        base = json.loads(file.read_text()).get("base_model_name_or_path")
    except (json.JSONDecodeError, AttributeError) as error:
        raise CheckpointError(f"{file} is not a valid adapter config: {error}") from None
    return base if isinstance(base, str) and base else None


def adapter_source(adapter_dir: str | Path, *, base: str | None = None) -> Any:
    """The `ModelSource` of `base` (default: the base the adapter records) with `adapter` set."""
    from ft.models.build import resolve_model

    directory = Path(adapter_dir).expanduser()
    if not is_adapter_dir(directory):
        raise CheckpointError(f"{directory} is not a LoRA adapter directory: {ADAPTER_CONFIG} is missing")
    base = base or recorded_base(directory)
    if base is None:
        raise ConfigError(f"the LoRA adapter {directory} does not record its base model "
                          "(base_model_name_or_path); pass the base as model=CARD_OR_PATH")
    try:
        source = resolve_model(base)
    except (ConfigError, CheckpointError) as error:
        raise type(error)(f"base model {base!r} of the LoRA adapter {directory}: {error}") from None
    if source.checkpoint is None:
        raise ConfigError(f"base model {base!r} of the LoRA adapter {directory} ({source.description}) has no "
                          "checkpoint; add `checkpoint:` to its card or pass model=PATH_TO_BASE")
    return dataclasses.replace(source, description=f"{source.description} + LoRA adapter {directory}",
                               adapter=directory)


@torch.no_grad()
def load_adapter_weights(model: nn.Module, state: Mapping[str, Tensor], *, source: Path) -> None:
    """Copy an adapter's tensors (ft names) into a model made by `apply_lora` with the same
    config; every rank copies its own shard. Every trainable tensor must be in `state`
    and every tensor of `state` must be trainable in the model."""
    params = dict(trainable_parameters(model))
    held_elsewhere = getattr(model, "held_elsewhere", None)
    if held_elsewhere is not None:  # a pipeline rank: the other ranks copy (and check) their blocks' tensors
        state = {name: tensor for name, tensor in state.items() if not held_elsewhere(name)}
    check_adapter_tensors({name: param.shape for name, param in params.items()}, state, source=source)
    for name, param in params.items():
        tensor = state[name]
        local, slices = _local_view(param)
        local.copy_(tensor[slices] if slices is not None else tensor)


def check_adapter_tensors(shapes: Mapping[str, torch.Size], state: Mapping[str, Tensor], *, source: Path,
                          require_all: bool = True) -> None:
    """CheckpointError unless each tensor of `state` is one of `shapes` (the model's adapter
    tensors, by ft name) with its shape, and, with `require_all`, each of `shapes` is in `state`."""
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if unexpected:
        raise CheckpointError(f"adapter tensor {unexpected[0]!r} in {source} matches no adapted layer of the "
                              "model: the adapter was trained on a different model")
    if missing and require_all:
        raise CheckpointError(f"adapter tensor {missing[0]!r} is missing from {source}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(shapes[name]):
            raise CheckpointError(f"adapter tensor {name!r} in {source} has shape {list(tensor.shape)}, the model "
                                  f"expects {list(shapes[name])}: the adapter was trained on a different model")


def create_model_with_adapter(source: Any, *, device: torch.device, dtype: torch.dtype,
                              parallelize: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
    """`source`'s base with the adapter `source.adapter` on it, in `dtype`, for inference."""
    from ft.models.build import create_model

    config, state = load_adapter(source.adapter)

    def inject(model: nn.Module) -> nn.Module:
        model = apply_lora(model, config, base_dtype=dtype, adapter_dtype=dtype)
        return parallelize(model) if parallelize is not None else model

    model = create_model(source.config, device=device, dtype=dtype, parallelize=inject, checkpoint=source.checkpoint)
    load_adapter_weights(model, state, source=source.adapter)
    model.requires_grad_(False)
    return model


def check_adapter_matches(config: LoraConfig, adapter_dir: Path) -> dict[str, Tensor]:
    """The adapter's tensors, when its settings are those of the `lora` section starting
    from it; else a ConfigError naming the first difference."""
    saved, state = load_adapter(adapter_dir)
    for key in ("rank", "alpha", "train_embeddings"):
        if getattr(saved, key) != getattr(config, key):
            raise ConfigError(f"config key 'lora.{key}' is {getattr(config, key)!r} but the adapter {adapter_dir} "
                              f"was trained with {getattr(saved, key)!r}; set lora.{key}={getattr(saved, key)}")
    if sorted(saved.target_modules) != sorted(config.target_modules):
        raise ConfigError(f"config key 'lora.target_modules' is {sorted(config.target_modules)} but the adapter "
                          f"{adapter_dir} adapts {sorted(saved.target_modules)}")
    return state


__all__ = ["adapter_source", "check_adapter_matches", "check_adapter_tensors", "create_model_with_adapter",
           "is_adapter_dir", "load_adapter_weights", "recorded_base"]
