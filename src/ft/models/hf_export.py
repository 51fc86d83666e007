"""Hugging Face export for every family: safetensors shards (+
`model.safetensors.index.json`) and the family's `config.json` /
`generation_config.json`, so a directory loads with
`transformers.AutoModelForCausalLM.from_pretrained(dir)` and vLLM without a
conversion step.

ft's parameter names are HF's, so export is a plain save; a tied `lm_head` is left
out, as transformers does. `save_hf_state_dict` takes any iterator of (name,
tensor) so a distributed trainer can stream gathered tensors one at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ft.dtypes import dtype_name
from ft.models.checkpoint_files import HF_INDEX
from ft.models.family import family_of

DEFAULT_MAX_SHARD_SIZE_BYTES = 5 * 1024**3

def write_hf_config(
    config: Any, out_dir: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16, tokenizer: Any = None
) -> None:
    """Write `config.json` and `generation_config.json` into the existing `out_dir`.

    With `tokenizer`, the BOS/EOS/PAD ids come from it (see `config_with_tokenizer_ids`).
    """
    family = family_of(config)
    if tokenizer is not None:
        config = config_with_tokenizer_ids(config, tokenizer)
    out = Path(out_dir)
    _write_json(out / "config.json", family.hf_config(config, dtype=dtype))
    _write_json(out / "generation_config.json", family.hf_generation_config(config))


def config_with_tokenizer_ids(config: Any, tokenizer: Any) -> Any:
    """`config` with the special-token ids of the tokenizer the run actually used.

    An arch records its own vocabulary's ids (Llama 3's 128000/128001); a model
    trained with another tokenizer and exported with those ids never stops
    generating. EOS becomes the token that ends a response (EOT for instruct
    tokenizers) followed by the tokenizer's other stop ids, so transformers and
    vLLM stop at end-of-turn as well as at end-of-text.
    """
    names = {f.name for f in dataclasses.fields(config)}
    eos = [tokenizer.end_of_response_id]
    eos += [i for i in tokenizer.stop_ids if i not in eos]
    updates: dict[str, Any] = {"eos_id": eos[0] if len(eos) == 1 else eos, "pad_id": tokenizer.pad_id}
    if tokenizer.bos_id is not None:
        updates["bos_id"] = tokenizer.bos_id
    return dataclasses.replace(config, **{k: v for k, v in updates.items() if k in names})


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def save_hf_state_dict(
    state_dict_items: Iterable[tuple[str, Tensor]],
    config: Any,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size_bytes: int = DEFAULT_MAX_SHARD_SIZE_BYTES,
    tokenizer: Any = None,
) -> list[Path]:
    """Write (name, tensor) pairs as HF safetensors shards + config files into `out_dir`.

    Tensors must be plain (full, not DTensor) tensors; they are cast to `dtype` and
    moved to CPU one at a time, and a shard is written as soon as it would exceed
    `max_shard_size_bytes`, so at most one shard is held in memory. One shard is
    `model.safetensors`; several are `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json`. Returns the written weight files.
    """
    from safetensors.torch import save_file

    dtype_name(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / HF_INDEX]:
        stale.unlink(missing_ok=True)  # a previous export with a different shard count

    temp_files: list[tuple[Path, list[str]]] = []
    shard: dict[str, Tensor] = {}
    shard_bytes = 0
    total_bytes = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if not shard:
            return
        file = out / f"model-{len(temp_files) + 1:05d}.safetensors.tmp"
        save_file(shard, str(file), metadata={"format": "pt"})
        temp_files.append((file, list(shard)))
        shard, shard_bytes = {}, 0

    seen = set()
    for name, tensor in state_dict_items:
        if config.tie_embeddings and name == "lm_head.weight":
            continue  # transformers re-ties it from embed_tokens
        if name in seen:
            raise ValueError(f"tensor {name!r} given twice")
        seen.add(name)
        tensor = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_size_bytes:
            flush()
        shard[name] = tensor
        shard_bytes += size
        total_bytes += size
    flush()
    if not temp_files:
        raise ValueError("no tensors to save")

    written = []
    weight_map = {}
    n = len(temp_files)
    for i, (tmp, names) in enumerate(temp_files, start=1):
        final = out / ("model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors")
        os.replace(tmp, final)
        written.append(final)
        weight_map.update({name: final.name for name in names})
    if n > 1:
        _write_json(out / HF_INDEX, {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})
    write_hf_config(config, out, dtype=dtype, tokenizer=tokenizer)
    if tokenizer is not None and hasattr(tokenizer, "save_hf"):
        tokenizer.save_hf(out)
    return written


def save_hf_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size_bytes: int = DEFAULT_MAX_SHARD_SIZE_BYTES,
    tokenizer: Any = None,
) -> list[Path]:
    """Save a (non-distributed) model as an HF directory; see `save_hf_state_dict`."""
    return save_hf_state_dict(
        model.state_dict().items(), model.config, out_dir, dtype=dtype,
        max_shard_size_bytes=max_shard_size_bytes, tokenizer=tokenizer,
    )
