"""Exporting a (possibly sharded) model as a Hugging Face directory from a training run."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ft.models.hf_export import save_hf_state_dict
from ft.models.parallelize import iter_full_state_dict


def export_hf_model(model: nn.Module, directory: Path, *, is_main: bool, dtype: torch.dtype,
                    tokenizer: Any = None, defer: bool = False) -> Callable[[], None] | None:
    """Write `model` (plain, FSDP/TP-sharded or DDP) to `directory` in the HF layout.

    A collective: every rank must call it; rank 0 gathers one tensor at a time and
    writes, the others only take part in the gathers. `defer`: rank 0 gathers the
    whole model into host memory (in `dtype`) and returns the write, for a
    background thread (`ft.training.background_save`); the gathers stay here.
    """
    # FSDP x TP weights are (_StridedShard, Shard) DTensors, whose gather torch does as
    # two all-gathers and warns about on every rank at every save; gathers do not
    # reduce, so the result is exact and the warning is noise.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    items = iter_full_state_dict(model, rank0_only=True, dtype=dtype if defer else None)
    if defer:
        gathered = list(items)  # empty on the other ranks
        if not is_main:
            return None
        return functools.partial(save_hf_state_dict, gathered, model.config, directory, dtype=dtype,
                                 tokenizer=tokenizer)
    if is_main:
        save_hf_state_dict(items, model.config, directory, dtype=dtype, tokenizer=tokenizer)
    else:
        for _ in items:  # take part in the gathers
            pass


def write_hf_model_from_state(directory: Path, state: dict[str, torch.Tensor], *, config: Any, dtype: torch.dtype,
                              tokenizer: Any = None) -> None:
    """Write a host copy of a model's full state dict (one process: `get_state_dict`'s
    names are the model's own) to `directory` in the HF layout, cast to `dtype` one
    tensor at a time."""
    save_hf_state_dict(state.items(), config, directory, dtype=dtype, tokenizer=tokenizer)
