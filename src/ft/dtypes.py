"""The dtype names users type (`dtype=bfloat16`) and the torch dtypes they mean.

The one table of them: configs, the CLI and checkpoint export all read `DTYPES` (its
names are `ft.dtype_names.DTYPE_NAMES`, which the CLI reads without torch).
"""

from __future__ import annotations

import torch

from ft.dtype_names import DTYPE_NAMES
from ft.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


def resolve_dtype(name: str, device: torch.device, *, key: str = "dtype") -> torch.dtype:
    """The dtype `name` names; `auto` is bfloat16 on GPUs and float32 elsewhere.
    An unknown name is a ConfigError naming config key `key`."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"config key '{key}': unknown dtype {name!r}; known: auto, {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The `torch_dtype` name HF configs use; ValueError for a dtype ft does not export."""
    for name, known in DTYPES.items():
        if known == dtype:
            return name
    raise ValueError(f"cannot export weights as {dtype}; use one of {', '.join(DTYPES)}")


__all__ = ["DTYPES", "dtype_name", "resolve_dtype"]
