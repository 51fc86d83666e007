"""ft's own trainer state (step, scheduler, data reader, grad scaler, RNG) without pickle.

The state is a tree of dicts, lists, tuples, numbers, strings, bytes and tensors.
Tensors go to `extra.safetensors` under the dotted path where they sat; the rest
goes to `extra.json`, with the tensors, tuples, bytes and non-string dict keys
spelled as small tagged objects. Reading either file runs no code, and a state
round-trips exactly: floats through JSON's shortest repr, tensors bit for bit
(RNG states are uint8 tensors), tuples stay tuples.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

JSON_NAME = "extra.json"
TENSORS_NAME = "extra.safetensors"
_TAG = "__ft_"  # tagged objects: {"__ft_tensor__": key}, {"__ft_tuple__": [...]}, ...


class ExtraStateError(Exception):
    """Extra state that cannot be written or read back (the caller names the file)."""


def _encode(value: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {_TAG + "float__": repr(value)}  # nan, inf, -inf: not JSON
    if isinstance(value, torch.Tensor):
        key = where or "root"
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {_TAG + "tensor__": key}
    if isinstance(value, bytes):
        return {_TAG + "bytes__": base64.b64encode(value).decode()}
    if isinstance(value, tuple):
        return {_TAG + "tuple__": [_encode(v, f"{where}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith(_TAG) for k in value):
            return {k: _encode(v, f"{where}.{k}" if where else k, tensors) for k, v in value.items()}
        items = []
        for k, v in value.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise ExtraStateError(f"trainer state key {k!r} at {where or 'the top'} is not a string or an int")
            items.append([k, _encode(v, f"{where}.{k}", tensors)])
        return {_TAG + "dict__": items}
    raise ExtraStateError(
        f"trainer state at {where or 'the top'} holds a {type(value).__name__}; "
        "only dicts, lists, tuples, numbers, strings, bytes and tensors are saved"
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, payload), = value.items()
        if tag == _TAG + "tensor__":
            if payload not in tensors:
                raise ExtraStateError(f"{TENSORS_NAME} has no tensor {payload!r}")
            return tensors[payload]
        if tag == _TAG + "tuple__":
            return tuple(_decode(v, tensors) for v in payload)
        if tag == _TAG + "bytes__":
            return base64.b64decode(payload, validate=True)
        if tag == _TAG + "float__":
            if payload not in ("nan", "inf", "-inf"):
                raise ExtraStateError(f"unknown float {payload!r}")
            return float(payload)
        if tag == _TAG + "dict__":
            return {k: _decode(v, tensors) for k, v in payload}
    if any(k.startswith(_TAG) for k in value):
        raise ExtraStateError(f"unknown tagged object {sorted(value)[:3]}")
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_extra_state(state: dict[str, Any], directory: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, "", tensors)
    save_file(tensors, str(directory / TENSORS_NAME))
    (directory / JSON_NAME).write_text(json.dumps(encoded, allow_nan=False))


def load_extra_state(directory: Path) -> dict[str, Any]:
    try:
        tensors = load_file(str(directory / TENSORS_NAME))
        encoded = json.loads((directory / JSON_NAME).read_text())
        return _decode(encoded, tensors)
    except ExtraStateError:
        raise
    except Exception as error:  # OSError, JSON errors, safetensors' own error type
        raise ExtraStateError(f"{type(error).__name__}: {error}") from None
