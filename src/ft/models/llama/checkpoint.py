"""Loading Llama weights from disk into an existing (possibly meta-built, then
`to_empty`'d) model, and reading the model config that sits beside them.

Formats:
- Hugging Face directory of `*.safetensors` (one file, or shards with
  `model.safetensors.index.json`); ft step directories use the same layout. Each
  tensor is read through a memory map (`safe_open`) and copied straight into the
  existing parameter storage (cast to its dtype and device on the way), one tensor
  at a time: never a whole state dict in memory, never two copies of a tensor. A
  parameter that is a DTensor (FSDP2 / TP) gets only its local shard read from disk.
- Meta `consolidated.NN.pth` (one per model-parallel rank) + `params.json`: shards
  are concatenated along each weight's split dimension, keys renamed to HF names,
  and wq/wk permuted from Meta's interleaved RoPE layout to rotate-half.

Missing or unexpected tensors and shape mismatches raise CheckpointError naming
the tensor and the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from ft.errors import CheckpointError
from ft.models.llama.model import Llama, LlamaConfig, LlamaRopeScaling

HF_INDEX = "model.safetensors.index.json"

# Keys some checkpoints carry that hold no weights of ours (old HF exports stored the RoPE table).
_IGNORED_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$|^rope\.freqs$")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
}


# ---------------------------------------------------------------------------------
# Format detection and configs


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


def _checkpoint_dir(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def read_checkpoint_config(path: Path) -> LlamaConfig:
    """The config stored beside a checkpoint: HF `config.json` or Meta `params.json`."""
    path = Path(path)
    fmt = checkpoint_format(path)
    directory = _checkpoint_dir(path)
    if fmt == "hf":
        file = directory / "config.json"
        if not file.is_file():
            raise CheckpointError(
                f"{directory} has safetensors but no config.json; name the arch in a card (model_arch) "
                "or write one with `ft llama write_hf_config --model ARCH DIR`"
            )
        return config_from_hf_dict(_read_json(file), source=str(file))
    file = directory / "params.json"
    if not file.is_file():
        raise CheckpointError(f"Meta checkpoint {directory} has no params.json; name the arch in a card (model_arch)")
    return config_from_meta_params(_read_json(file), source=str(file))


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file} is not valid JSON: {error}") from None


def config_from_hf_dict(d: dict, *, source: str = "config.json") -> LlamaConfig:
    """LlamaConfig from an HF Llama config.json (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
    model_type = d.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(f"{source}: model_type is {model_type!r}, only 'llama' is supported")
    try:
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported (only default and llama3)")
        theta = d.get("rope_theta", rope.get("rope_theta", 10_000.0))
        scaling = None
        if rope_type == "llama3":
            scaling = LlamaRopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        n_heads = int(d["num_attention_heads"])
        dim = int(d["hidden_size"])
        head_dim = d.get("head_dim")
        if head_dim is not None and int(head_dim) != dim // n_heads:
            raise CheckpointError(f"{source}: head_dim={head_dim} != hidden_size / num_attention_heads; not supported")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise CheckpointError(f"{source}: {flag}=true is not supported by ft's Llama")
        return LlamaConfig(
            vocab_size=int(d["vocab_size"]),
            dim=dim,
            n_layers=int(d["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
            ffn_dim=int(d["intermediate_size"]),
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_seq_len=int(d.get("max_position_embeddings", 2048)),
            bos_id=d.get("bos_token_id", 1),
            eos_id=d.get("eos_token_id", 2),
            pad_id=d.get("pad_token_id"),
            init_std=float(d.get("initializer_range", 0.02)),
        )
    except KeyError as error:
        raise CheckpointError(f"{source}: missing key {error.args[0]!r}") from None


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward hidden size: 2/3 of 4*dim, scaled, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def config_from_meta_params(p: dict, *, source: str = "params.json") -> LlamaConfig:
    """LlamaConfig from Meta's params.json. Llama 2 files say vocab_size -1 (32000)."""
    try:
        dim, n_heads = int(p["dim"]), int(p["n_heads"])
        vocab = int(p.get("vocab_size", -1))
        llama3 = vocab == 128256 or float(p.get("rope_theta", 10_000.0)) == 500_000.0
        if vocab <= 0:
            vocab = 32000
        # Meta's params.json for 3.1/3.2 says only `use_scaled_rope`; the factor and the
        # tying live in Meta's code, by model size (3.2 1B/3B: factor 32, tied; else 8),
        # which is also how transformers' converter decides. An explicit key wins.
        small_llama3 = llama3 and dim in (2048, 3072)
        scaling = None
        if p.get("use_scaled_rope"):
            defaults = LlamaRopeScaling()
            scaling = LlamaRopeScaling(
                factor=float(p.get("rope_scaling_factor") or (32.0 if small_llama3 else 8.0)),
                low_freq_factor=float(p.get("low_freq_factor", defaults.low_freq_factor)),
                high_freq_factor=float(p.get("high_freq_factor", defaults.high_freq_factor)),
                original_max_position_embeddings=int(
                    p.get("original_max_position_embeddings", defaults.original_max_position_embeddings)
                ),
            )
        tie = p.get("tie_embeddings", small_llama3)
        return LlamaConfig(
            vocab_size=vocab,
            dim=dim,
            n_layers=int(p["n_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(p.get("n_kv_heads") or n_heads),
            ffn_dim=meta_ffn_dim(dim, int(p.get("multiple_of", 256)), p.get("ffn_dim_multiplier")),
            norm_eps=float(p.get("norm_eps", 1e-5)),
            rope_theta=float(p.get("rope_theta", 10_000.0)),
            rope_scaling=scaling,
            tie_embeddings=bool(tie),
            max_seq_len=131072 if scaling else (8192 if llama3 else 4096),
            bos_id=128000 if llama3 else 1,
            eos_id=128001 if llama3 else 2,
        )
    except KeyError as error:
        raise CheckpointError(f"{source}: missing key {error.args[0]!r}") from None


# ---------------------------------------------------------------------------------
# Loading into a model


def load_checkpoint(model: Llama, path: Path) -> None:
    """Load the weights at `path` (any supported format) into `model` in place."""
    path = Path(path)
    if checkpoint_format(path) == "hf":
        load_hf_checkpoint(model, path)
    else:
        load_meta_checkpoint(model, path)


def _expected_params(model: nn.Module) -> dict[str, Tensor]:
    """Checkpoint key -> parameter; a tied lm_head is not expected on disk."""
    params = dict(model.named_parameters(remove_duplicate=True))
    return params


def hf_safetensors_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> file of an HF safetensors dir (index, else every *.safetensors)."""
    index = directory / HF_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = {name: directory / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise CheckpointError(f"{index} names {file.name}, which is missing from {directory}")
        return files
    from safetensors import safe_open

    files = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in files:
                    raise CheckpointError(f"tensor {name!r} is in both {files[name].name} and {file.name} of {directory}")
                files[name] = file
    return files


def _local_slices(param: Tensor) -> tuple[Tensor, tuple[slice, ...] | None]:
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
def load_hf_checkpoint(model: Llama, path: Path) -> None:
    """Load an HF / ft safetensors dir (or one .safetensors file) into `model`, tensor by tensor."""
    from safetensors import safe_open

    path = Path(path)
    files = {n: path for n in _safetensors_keys(path)} if path.is_file() else hf_safetensors_files(path)
    params = _expected_params(model)
    tied = model.config.tie_embeddings
    for name, file in files.items():
        if _IGNORED_KEY.search(name) or (tied and name == "lm_head.weight"):
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
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in names:
                param = params[name]
                disk = f.get_slice(name)
                shape = tuple(disk.get_shape())
                if shape != tuple(param.shape):
                    raise CheckpointError(
                        f"tensor {name!r} in {file} has shape {list(shape)}, the model expects {list(param.shape)}"
                    )
                local, slices = _local_slices(param)
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
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as f:
        head = f.get_tensor("lm_head.weight")
    if head.shape != embedding.shape or not torch.equal(head.to(embedding.dtype), embedding.cpu()):
        raise CheckpointError(
            f"tensor 'lm_head.weight' in {file} differs from model.embed_tokens.weight, but the config ties "
            "them (tie_embeddings / tie_word_embeddings); use an untied config for this checkpoint"
        )


def _safetensors_keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


def checkpoint_dtype(path: Path) -> torch.dtype:
    """The dtype the checkpoint's floating-point weights are stored in."""
    path = Path(path)
    if checkpoint_format(path) == "hf":
        from safetensors import safe_open

        files = [path] if path.is_file() else sorted(_checkpoint_dir(path).glob("*.safetensors"))
        with safe_open(str(files[0]), framework="pt") as f:
            for name in f.keys():
                dtype = _SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype())
                if dtype is not None and dtype.is_floating_point:
                    return dtype
        return torch.float32
    shard = torch.load(_meta_shard_files(path)[0], map_location="cpu", mmap=True, weights_only=True)
    for tensor in shard.values():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


# ---------------------------------------------------------------------------------
# Meta consolidated.NN.pth


def _meta_shard_files(path: Path) -> list[Path]:
    directory = _checkpoint_dir(Path(path))
    files = sorted(directory.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"no consolidated.NN.pth files in {directory}")
    return files


_META_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_META_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
# Split dim of each model-parallel weight (fairscale / Meta's llama code): column-parallel
# layers split their output rows, row-parallel layers (wo, w2) their input columns.
_META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def meta_to_hf_key(key: str) -> str | None:
    """HF name of a Meta key; None for keys that hold no weights of ours."""
    if key in _META_TOP:
        return _META_TOP[key]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m and m.group(2) in _META_KEYS:
        return f"model.layers.{m.group(1)}.{_META_KEYS[m.group(2)]}"
    return None


def permute_meta_to_hf(w: Tensor, n_heads: int) -> Tensor:
    """Meta's interleaved RoPE pairs (x0,x1),(x2,x3)... -> HF's rotate-half halves, per head."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _merge_meta_shards(key: str, shards: list[Tensor], dim: int) -> Tensor:
    if len(shards) == 1:
        return shards[0]
    if shards[0].ndim == 1:  # norms are replicated on every rank
        return shards[0]
    leaf = key.split(".")[-2]
    if key == "tok_embeddings.weight":
        # Llama 2 split the embedding dim (ParallelEmbedding), Llama 3 the vocab (VocabParallelEmbedding).
        split = 1 if shards[0].shape[1] != dim else 0
    else:
        split = _META_SPLIT_DIM.get(leaf, 0)
    return torch.cat(shards, dim=split)


def iter_meta_state_dict(path: Path, config: LlamaConfig) -> Iterator[tuple[str, Tensor, Path]]:
    """(HF name, tensor, file) of a Meta checkpoint, converted key by key."""
    files = _meta_shard_files(path)
    shards = []
    for file in files:
        try:
            shards.append(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
        except Exception as error:  # torch raises several types for a corrupt/foreign file
            raise CheckpointError(f"cannot read Meta checkpoint shard {file}: {error}") from None
    for key in shards[0]:
        name = meta_to_hf_key(key)
        if name is None:
            if _IGNORED_KEY.search(key):
                continue
            raise CheckpointError(f"unexpected tensor {key!r} in {files[0]}: not a Llama weight")
        parts = []
        for file, shard in zip(files, shards):
            if key not in shard:
                raise CheckpointError(f"tensor {key!r} is in {files[0].name} but missing from {file}")
            parts.append(shard[key])
        tensor = _merge_meta_shards(key, parts, config.dim)
        if name.endswith("q_proj.weight"):
            tensor = permute_meta_to_hf(tensor, config.n_heads)
        elif name.endswith("k_proj.weight"):
            tensor = permute_meta_to_hf(tensor, config.n_kv_heads)
        yield name, tensor, files[0]


@torch.no_grad()
def load_meta_checkpoint(model: Llama, path: Path) -> None:
    """Load Meta `consolidated.NN.pth` shard(s) into `model` (rename + q/k permute)."""
    params = _expected_params(model)
    seen = set()
    for name, tensor, file in iter_meta_state_dict(path, model.config):
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue  # Meta stores output.weight even for tied models; it equals the embedding
        if name not in params:
            raise CheckpointError(f"unexpected tensor {name!r} in {file}: the model has no such parameter")
        param = params[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(
                f"tensor {name!r} (converted from {file}) has shape {list(tensor.shape)}, the model expects {list(param.shape)}"
            )
        local, slices = _local_slices(param)
        local.copy_(tensor[slices] if slices is not None else tensor)
        seen.add(name)
    missing = [n for n in params if n not in seen]
    if missing:
        raise CheckpointError(f"tensor {missing[0]!r} is missing from Meta checkpoint {_checkpoint_dir(Path(path))}")


def check_hf_dir_matches(config: LlamaConfig, directory: Path) -> None:
    """Raise CheckpointError if the safetensors in `directory` do not fit `config` (names and shapes only)."""
    from safetensors import safe_open

    with torch.device("meta"):
        model = Llama(config)
    params = _expected_params(model)
    files = hf_safetensors_files(Path(directory))
    for name, file in files.items():
        if _IGNORED_KEY.search(name) or (config.tie_embeddings and name == "lm_head.weight"):
            continue
        if name not in params:
            raise CheckpointError(f"unexpected tensor {name!r} in {file}: the model has no such parameter")
        with safe_open(str(file), framework="pt") as f:
            shape = list(f.get_slice(name).get_shape())
        if shape != list(params[name].shape):
            raise CheckpointError(f"tensor {name!r} in {file} has shape {shape}, the arch expects {list(params[name].shape)}")
    missing = [n for n in params if n not in files]
    if missing:
        raise CheckpointError(f"tensor {missing[0]!r} is missing from {directory}")
