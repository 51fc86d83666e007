"""Adapters on disk exactly as PEFT writes them, so `peft.PeftModel.from_pretrained`
and vLLM (`--enable-lora`) load them without key edits:

- `adapter_model.safetensors`: `base_model.model.<HF module name>.lora_A.weight` /
  `.lora_B.weight` for each adapted linear; with trained embeddings also
  `base_model.model.model.embed_tokens.weight` (and `lm_head.weight`), PEFT's
  `modules_to_save` layout; nothing else;
- `adapter_config.json`: PEFT's `LoraConfig` fields.

ft's parameter names are HF's, so a PEFT key is ft's name with the prefix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ft.errors import CheckpointError
from ft.lora.config import LoraConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_key(name: str) -> str:
    return PEFT_PREFIX + name


def ft_name(key: str) -> str:
    if not key.startswith(PEFT_PREFIX):
        raise CheckpointError(f"adapter tensor {key!r} does not start with {PEFT_PREFIX!r} (not a PEFT LoRA adapter)")
    return key[len(PEFT_PREFIX):]


def adapter_config_dict(config: LoraConfig, *, base_model_name_or_path: str | None,
                        modules_to_save: list[str] | None) -> dict[str, Any]:
    """PEFT's adapter_config.json for a plain LoRA adapter (no DoRA, rsLoRA or bias)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(config.target_modules),
        "modules_to_save": modules_to_save,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_adapter(directory: str | os.PathLike, state: Mapping[str, Tensor], config: LoraConfig, *,
                 dtype: torch.dtype, base_model_name_or_path: str | None = None) -> Path:
    """Write `state` (ft name -> tensor, e.g. `ft.lora.lora_state_dict`) as a PEFT adapter directory."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    modules_to_save = set()
    for name, tensor in state.items():
        if ".lora_A." not in name and ".lora_B." not in name:
            module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
            modules_to_save.add(module)
        tensors[peft_key(name)] = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    if not tensors:
        raise ValueError("no adapter tensors to save")
    tmp = out / (ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / ADAPTER_WEIGHTS)
    data = adapter_config_dict(config, base_model_name_or_path=base_model_name_or_path,
                               modules_to_save=sorted(modules_to_save) or None)
    tmp = out / (ADAPTER_CONFIG + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, out / ADAPTER_CONFIG)
    return out


def load_adapter(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, Tensor]]:
    """(config, ft name -> tensor) of a PEFT LoRA adapter directory (ft's or PEFT's own)."""
    from safetensors.torch import load_file

    path = Path(directory)
    config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for file in (config_file, weights_file):
        if not file.is_file():
            raise CheckpointError(f"{path} is not a LoRA adapter directory: {file.name} is missing")
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file} is not valid JSON: {error}") from None
    if data.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_file}: peft_type {data.get('peft_type')!r} is not supported; only LORA")
    unsupported = [k for k in ("use_dora", "use_rslora", "fan_in_fan_out") if data.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern") if data.get(k)]
    if data.get("bias", "none") != "none":
        unsupported.append(f"bias={data['bias']!r}")
    if unsupported:
        raise CheckpointError(f"{config_file}: ft does not support {', '.join(unsupported)}")
    target = data.get("target_modules")
    if isinstance(target, str):  # PEFT also allows a regex; ft reads lists of names
        raise CheckpointError(f"{config_file}: target_modules as a regex ({target!r}) is not supported; list the names")
    config = LoraConfig(
        enabled=True, rank=int(data["r"]), alpha=float(data["lora_alpha"]), dropout=float(data.get("lora_dropout", 0.0)),
        target_modules=list(target), train_embeddings=bool(data.get("modules_to_save")),
    )
    state = {ft_name(key): tensor for key, tensor in load_file(str(weights_file)).items()}
    return config, state
