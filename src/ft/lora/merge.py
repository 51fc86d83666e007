"""Merging an adapter into its base: W' = W + (alpha / r) B A, written as an HF directory.

The base weights are always read from the base checkpoint at the precision it
stores (never from a training run's bf16 or NF4 copy), merged in float32 and cast
once to the export dtype; tensors stream one at a time, so merging an 8B model
needs memory for one tensor, not the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import Tensor

from ft.errors import CheckpointError
from ft.lora.config import LoraConfig


def iter_checkpoint_tensors(path: Path, config: Any) -> Iterator[tuple[str, Tensor]]:
    """(HF name, tensor) of every weight in a base checkpoint (HF safetensors or Meta layout)."""
    from ft.models.checkpoint_files import IGNORED_KEY, checkpoint_format, hf_safetensors_files
    from ft.models.family import family_of

    path = Path(path)
    if checkpoint_format(path) == "hf":
        from safetensors import safe_open

        files = {name: path for name in _keys(path)} if path.is_file() else hf_safetensors_files(path)
        by_file: dict[Path, list[str]] = {}
        for name, file in files.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names:
                    if not IGNORED_KEY.search(name):
                        yield name, f.get_tensor(name)
    else:
        for name, tensor, _ in family_of(config).iter_meta_state_dict(path, config):
            yield name, tensor


def _keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


def merge_tensors(base: Iterable[tuple[str, Tensor]], adapter: Mapping[str, Tensor],
                  config: LoraConfig) -> Iterator[tuple[str, Tensor]]:
    """The base's (name, tensor) with each adapted weight merged and trained embeddings replaced (float32)."""
    pairs: dict[str, dict[str, Tensor]] = {}
    replaced: dict[str, Tensor] = {}
    for name, tensor in adapter.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if name.endswith(marker):
                pairs.setdefault(name[: -len(marker)] + ".weight", {})[part] = tensor
                break
        else:
            replaced[name] = tensor
    used = set()
    for name, tensor in base:
        if name in pairs:
            pair = pairs[name]
            if set(pair) != {"lora_A", "lora_B"}:
                raise CheckpointError(f"adapter for {name!r} lacks {({'lora_A', 'lora_B'} - set(pair)).pop()}")
            delta = (pair["lora_B"].float() @ pair["lora_A"].float()) * config.scaling
            if delta.shape != tensor.shape:
                raise CheckpointError(f"adapter for {name!r} has shape {list(delta.shape)}, the base weight "
                                      f"{list(tensor.shape)}: the adapter was trained on a different model")
            tensor = tensor.float() + delta
            used.add(name)
        elif name in replaced:
            tensor = replaced[name].float()
            used.add(name)
        yield name, tensor
    unused = sorted((set(pairs) | set(replaced)) - used)
    if unused:
        raise CheckpointError(f"adapter tensor(s) for {unused[0]!r} match no weight of the base"
                              + (f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""))


def check_adapter_fits(model_config: Any, config: LoraConfig, adapter: Mapping[str, Tensor], *, source: Path) -> None:
    """CheckpointError, before any tensor is read, when the adapter (`config`, tensors by ft
    name) does not fit the model `model_config` describes: an adapted layer it lacks, or a shape."""
    from ft.lora.adapter_model import check_adapter_tensors
    from ft.lora.apply import adaptable_module_names, apply_lora, trainable_parameters
    from ft.lora.peft_io import ADAPTER_CONFIG
    from ft.models.family import build_meta_model

    model = build_meta_model(model_config, torch.float32)  # shapes only: nothing is allocated
    valid = adaptable_module_names(model)
    unknown = [name for name in config.target_modules if name not in valid]
    if unknown:
        raise CheckpointError(f"{source / ADAPTER_CONFIG}: target_modules {unknown[0]!r} is not a linear layer of the "
                              f"base model's blocks ({', '.join(valid)}): the adapter was trained on a different model")
    apply_lora(model, config, base_dtype=torch.float32)
    # A PEFT adapter may adapt only some layers (layers_to_transform): missing tensors merge as zero.
    check_adapter_tensors({name: p.shape for name, p in trainable_parameters(model)}, adapter, source=source,
                          require_all=False)


def merge_adapter(base: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                  dtype: torch.dtype = torch.bfloat16, tokenizer: Any = None) -> Path:
    """Merge the PEFT adapter in `adapter_dir` into `base` (a model card or checkpoint path)
    and write the result to `out_dir` in the HF layout."""
    from ft.models.build import require_checkpoint, resolve_model
    from ft.models.hf_export import save_hf_state_dict
    from ft.lora.peft_io import load_adapter

    config, adapter = load_adapter(adapter_dir)
    source = resolve_model(base)
    checkpoint = require_checkpoint(source)
    out = Path(out_dir)
    if out.resolve() in (Path(adapter_dir).resolve(), Path(checkpoint).resolve()):
        raise CheckpointError(f"the merged model must go to a new directory, not {out}")
    check_adapter_fits(source.config, config, adapter, source=Path(adapter_dir))
    base_items = iter_checkpoint_tensors(checkpoint, source.config)
    save_hf_state_dict(merge_tensors(base_items, adapter, config), source.config, out, dtype=dtype,
                       tokenizer=tokenizer)
    return out
