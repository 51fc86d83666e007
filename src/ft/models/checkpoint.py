"""Reading weights from disk into an existing (possibly meta-built, parallelized, then
`to_empty`'d) model of any family, and reading the model config that sits beside them.

Formats:
- Hugging Face directory of `*.safetensors` (one file, or shards with
  `model.safetensors.index.json`); ft step directories use the same layout. Each
  tensor is read through a memory map (`safe_open`) and copied straight into the
  existing parameter storage (cast to its dtype and device on the way), one tensor
  at a time: never a whole state dict in memory, never two copies of a tensor. A
  parameter that is a DTensor (FSDP2 / TP) gets only its local shard read from disk.
  The family comes from `config.json`'s `model_type`.
- Meta `consolidated.NN.pth` + `params.json`, for families with a Meta reader
  (`ModelFamily.iter_meta_state_dict` converts names and layouts).

Every tensor in the file and every parameter of the model is accounted for: a
missing or unexpected tensor, or a shape mismatch, raises CheckpointError naming
the tensor and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ft.errors import CheckpointError
from ft.models.checkpoint_files import (
    IGNORED_KEY, SAFETENSORS_DTYPES, checkpoint_dir_of, checkpoint_format, hf_safetensors_files, meta_shard_files,
    open_safetensors, read_json, safetensors_keys,
)
from ft.models.family import build_meta_model, family_for_hf_config, family_of, meta_layout_family


def _expected_params(model: nn.Module) -> dict[str, Tensor]:
    """Checkpoint key -> parameter; a tied lm_head is not expected on disk, nor the
    parameters of the children a wrapper adds to its base module (LoRA adapters name
    them in `adapter_children`): a base checkpoint has none."""
    skip = tuple(f"{name}.{child}." if name else f"{child}."
                 for name, module in model.named_modules() for child in getattr(module, "adapter_children", ()))
    return {n: p for n, p in model.named_parameters(remove_duplicate=True) if not n.startswith(skip)}


def local_slices(param: Tensor) -> tuple[Tensor, tuple[slice, ...] | None]:
    """(local storage to fill, slices of the full tensor it holds; None = all of it)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return param, None
    if not isinstance(param, DTensor):
        return param, None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.to_local(), tuple(slice(o, o + s) for o, s in zip(offset, shape))


@torch.no_grad()
def load_hf_checkpoint(model: nn.Module, path: Path) -> None:
    """Load an HF / ft safetensors dir (or one .safetensors file) into `model`, tensor by tensor."""
    path = Path(path)
    files = {n: path for n in safetensors_keys(path)} if path.is_file() else hf_safetensors_files(path)
    params = _expected_params(model)
    tied = model.config.tie_embeddings
    # A pipeline stage holds some of the model's tensors; the other stages load the rest.
    partial = getattr(model, "holds_part_of_model", False)
    for name, file in files.items():
        if IGNORED_KEY.search(name) or (tied and name == "lm_head.weight") or partial:
            continue
        if name not in params:
            raise CheckpointError(f"unexpected tensor {name!r} in {file}: the model has no such parameter")
    missing = [n for n in params if n not in files]
    if missing:
        raise CheckpointError(
            f"tensor {missing[0]!r} is missing from checkpoint {path}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    by_file: dict[Path, list[str]] = {}
    for name in params:
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        # Reading on CPU through the mmap: only the bytes of the tensor (or local shard)
        # being copied are paged in, and the copy lands in the parameter's own storage.
        with open_safetensors(file) as f:
            for name in names:
                param = params[name]
                disk = f.get_slice(name)
                shape = tuple(disk.get_shape())
                if shape != tuple(param.shape):
                    raise CheckpointError(
                        f"tensor {name!r} in {file} has shape {list(shape)}, the model expects {list(param.shape)}"
                    )
                local, slices = local_slices(param)
                tensor = disk[slices] if slices is not None else f.get_tensor(name)
                local.copy_(tensor)
                del tensor
    if tied and "lm_head.weight" in files and not isinstance(params["model.embed_tokens.weight"], _dtensor_type()):
        _check_tied_head(params["model.embed_tokens.weight"], files["lm_head.weight"])


def _dtensor_type() -> type:
    try:
        from torch.distributed.tensor import DTensor

        return DTensor
    except ImportError:  # pragma: no cover
        return type(None)


def _check_tied_head(embedding: Tensor, file: Path) -> None:
    """A tied config must not silently drop a trained, different lm_head."""
    with open_safetensors(file) as f:
        head = f.get_tensor("lm_head.weight")
    if head.shape != embedding.shape or not torch.equal(head.to(embedding.dtype), embedding.cpu()):
        raise CheckpointError(
            f"tensor 'lm_head.weight' in {file} differs from model.embed_tokens.weight, but the config ties "
            "them (tie_embeddings / tie_word_embeddings); use an untied config for this checkpoint"
        )


def read_checkpoint_config(path: Path) -> Any:
    """The config stored beside a checkpoint: HF `config.json` or Meta `params.json`."""
    path = Path(path)
    fmt = checkpoint_format(path)
    directory = checkpoint_dir_of(path)
    if fmt == "hf":
        file = directory / "config.json"
        if not file.is_file():
            raise CheckpointError(
                f"{directory} has safetensors but no config.json; name the arch in a card (model_arch) "
                "or write one with `ft <family> write_hf_config --model ARCH DIR`"
            )
        config_json = read_json(file)
        return family_for_hf_config(config_json, source=str(file)).config_from_hf(config_json, source=str(file))
    file = directory / "params.json"
    if not file.is_file():
        raise CheckpointError(f"Meta checkpoint {directory} has no params.json; name the arch in a card (model_arch)")
    return meta_layout_family().config_from_meta(read_json(file), source=str(file))


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load the weights at `path` (any supported format) into `model` in place."""
    path = Path(path)
    if checkpoint_format(path) == "hf":
        load_hf_checkpoint(model, path)
    else:
        load_meta_checkpoint(model, path)


@torch.no_grad()
def load_meta_checkpoint(model: nn.Module, path: Path) -> None:
    """Load Meta `consolidated.NN.pth` shard(s) into `model`, converted by its family."""
    family = family_of(model)
    if family.iter_meta_state_dict is None:
        raise CheckpointError(f"{path}: the {family.name} family has no Meta (consolidated.NN.pth) layout")
    params = _expected_params(model)
    tied = model.config.tie_embeddings
    seen = set()
    tied_head: tuple[Tensor, Path] | None = None
    for name, tensor, file in family.iter_meta_state_dict(path, model.config):
        if name == "lm_head.weight" and tied:
            tied_head = (tensor, file)  # Meta stores output.weight even for tied models; checked below
            continue
        if name not in params:
            raise CheckpointError(f"unexpected tensor {name!r} in {file}: the model has no such parameter")
        param = params[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(
                f"tensor {name!r} (converted from {file}) has shape {list(tensor.shape)}, the model expects {list(param.shape)}"
            )
        local, slices = local_slices(param)
        local.copy_(tensor[slices] if slices is not None else tensor)
        seen.add(name)
    missing = [n for n in params if n not in seen]
    if missing:
        raise CheckpointError(f"tensor {missing[0]!r} is missing from Meta checkpoint {checkpoint_dir_of(Path(path))}")
    if tied_head is not None:
        head, file = tied_head
        embedding = params["model.embed_tokens.weight"]
        if not isinstance(embedding, _dtensor_type()) and (
            head.shape != embedding.shape or not torch.equal(head.to(embedding.dtype), embedding.cpu())
        ):
            raise CheckpointError(
                f"tensor 'output.weight' in {file} differs from tok_embeddings.weight, but the config ties them "
                "(tie_embeddings); use an untied config (model_config: {tie_embeddings: false}) for this checkpoint"
            )


def checkpoint_dtype(path: Path) -> torch.dtype:
    """The dtype the checkpoint's floating-point weights are stored in."""
    path = Path(path)
    if checkpoint_format(path) == "hf":
        files = [path] if path.is_file() else sorted(checkpoint_dir_of(path).glob("*.safetensors"))
        with open_safetensors(files[0]) as f:
            for name in f.keys():
                dtype = SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype())
                if dtype is not None and dtype.is_floating_point:
                    return dtype
        return torch.float32
    shard = torch.load(meta_shard_files(path)[0], map_location="cpu", mmap=True, weights_only=True)
    for tensor in shard.values():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def check_hf_dir_matches(config: Any, directory: Path) -> None:
    """Raise CheckpointError if the safetensors in `directory` do not fit `config` (names and shapes only)."""
    params = _expected_params(build_meta_model(config, torch.float32))
    files = hf_safetensors_files(Path(directory))
    for name, file in files.items():
        if IGNORED_KEY.search(name) or (config.tie_embeddings and name == "lm_head.weight"):
            continue
        if name not in params:
            raise CheckpointError(f"unexpected tensor {name!r} in {file}: the model has no such parameter")
        with open_safetensors(file) as f:
            shape = list(f.get_slice(name).get_shape())
        if shape != list(params[name].shape):
            raise CheckpointError(f"tensor {name!r} in {file} has shape {shape}, the arch expects {list(params[name].shape)}")
    missing = [n for n in params if n not in files]
    if missing:
        raise CheckpointError(f"tensor {missing[0]!r} is missing from {directory}")
