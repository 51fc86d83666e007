"""The files of a checkpoint, apart from any model: which format a path holds
(HF / ft safetensors or Meta `consolidated.NN.pth`), where each tensor of an HF
directory lives, and safe opening of safetensors files. Family folders use these
too, so this module imports no family and no family lookup."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from ft.errors import CheckpointError

HF_INDEX = "model.safetensors.index.json"


IGNORED_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$|^rope\.freqs$")


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
}


@contextlib.contextmanager
def open_safetensors(file: Path) -> Iterator[Any]:
    """`safe_open` on CPU (a memory map), with a truncated or garbage file as one
    CheckpointError naming it instead of the library's error."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            yield f
    except (SafetensorError, OSError) as error:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({reason}); it may be truncated or damaged: "
            "copy or export it again"
        ) from None


def checkpoint_format(path: Path) -> str:
    """'hf' (safetensors dir, also ft step dirs) or 'meta' (consolidated.NN.pth)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.suffix == ".pth":
            return "meta"
        if path.suffix == ".safetensors":
            return "hf"
        raise CheckpointError(f"checkpoint {path}: expected a directory, a *.safetensors or a consolidated.NN.pth file")
    if any(path.glob("*.safetensors")):
        return "hf"
    if any(path.glob("consolidated.*.pth")):
        return "meta"
    raise CheckpointError(
        f"checkpoint directory {path} holds neither *.safetensors files (Hugging Face / ft layout) "
        "nor consolidated.NN.pth files (Meta layout)"
    )


def checkpoint_dir_of(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file} is not valid JSON: {error}") from None


def hf_safetensors_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> file of an HF safetensors dir (index, else every *.safetensors)."""
    index = directory / HF_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = {name: directory / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise CheckpointError(f"{index} names {file.name}, which is missing from {directory}")
        return files
    files = {}
    for file in sorted(directory.glob("*.safetensors")):
        with open_safetensors(file) as f:
            for name in f.keys():
                if name in files:
                    raise CheckpointError(f"tensor {name!r} is in both {files[name].name} and {file.name} of {directory}")
                files[name] = file
    return files


def safetensors_keys(file: Path) -> list[str]:
    with open_safetensors(file) as f:
        return list(f.keys())


def meta_shard_files(path: Path) -> list[Path]:
    directory = checkpoint_dir_of(Path(path))
    files = sorted(directory.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"no consolidated.NN.pth files in {directory}")
    return files
