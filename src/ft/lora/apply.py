"""Turning a model into a LoRA model: freeze the base, inject adapters by HF name.

`apply_lora` runs on the meta-built model, before parallelization, so FSDP, TP,
activation checkpointing and compile all see the adapters. Frozen weights are
cast to the compute dtype (no float32 master copy of weights that never change);
adapters stay in the master dtype. `init_lora_weights` gives the adapters their
start values after the base is loaded: A from a generator seeded by the run seed
and the module name, B zeros, the same on any layout.
"""

from __future__ import annotations

import zlib
from typing import Iterator

import torch
from torch import Tensor, nn

from ft.errors import ConfigError
from ft.lora.config import LoraConfig
from ft.lora.layers import LoraLinear

EMBEDDING_MODULES = ("embed_tokens", "lm_head")


def adaptable_module_names(model: nn.Module) -> list[str]:
    """The names (last component) of the linear layers inside the model's blocks."""
    names = set()
    for block in model.model.layers:
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and name:
                names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_target_modules(model: nn.Module, target_modules: list[str], *, key: str = "lora.target_modules") -> None:
    valid = adaptable_module_names(model)
    unknown = [name for name in target_modules if name not in valid]
    if unknown:
        raise ConfigError(
            f"config key '{key}': {', '.join(repr(n) for n in unknown)} "
            f"{'is not a linear layer' if len(unknown) == 1 else 'are not linear layers'} of this model's blocks; "
            f"valid names: {', '.join(valid)}"
        )


def apply_lora(model: nn.Module, config: LoraConfig, *, base_dtype: torch.dtype,
               adapter_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Freeze `model`, cast its frozen weights to `base_dtype`, and wrap every block linear
    named in `config.target_modules` in a `LoraLinear` (adapters in `adapter_dtype`).
    With `train_embeddings` the embedding and output projection stay trainable in
    `adapter_dtype`; with `embeddings_on_host` the frozen input embedding becomes a
    `HostEmbedding`. Returns `model`, changed in place."""
    check_target_modules(model, config.target_modules)
    targets = set(config.target_modules)
    for block in model.model.layers:
        for name, module in list(block.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, nn.Linear) and not isinstance(module, LoraLinear) and leaf in targets:
                parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
                wrapped = LoraLinear.wrap(module, rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                                          dtype=adapter_dtype)
                setattr(parent, leaf, wrapped)
    trainable_modules = {id(m) for lora in _lora_modules(model) for m in (lora.lora_A, lora.lora_B)}
    if config.train_embeddings:
        trainable_modules |= {id(model.model.embed_tokens), id(model.lm_head)}
    for module in model.modules():
        trainable = id(module) in trainable_modules
        for name, param in list(module.named_parameters(recurse=False)):
            dtype = adapter_dtype if trainable else base_dtype
            module.register_parameter(name, nn.Parameter(param.detach().to(dtype), requires_grad=trainable))
    model.tie_weights()  # each module got its own Parameter above
    if config.embeddings_on_host:
        from ft.lora.host_embedding import keep_embeddings_on_host

        keep_embeddings_on_host(model)
    return model


def _lora_modules(model: nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def is_lora_model(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLinear) for m in model.modules())


def _local_view(param: Tensor) -> tuple[Tensor, tuple[slice, ...] | None]:
    """(local storage, the slices of the full tensor it holds; None = all of it)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param, None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.to_local(), tuple(slice(o, o + s) for o, s in zip(offset, shape))


@torch.no_grad()
def init_lora_weights(model: nn.Module, seed: int) -> None:
    """PEFT's default init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a=sqrt(5)), B = 0.
    A is drawn in full on the CPU from (seed, module name), then each rank copies its shard."""
    for name, module in model.named_modules():
        if not isinstance(module, LoraLinear):
            continue
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        weight_A = module.lora_A.weight
        bound = 1.0 / weight_A.shape[1] ** 0.5
        full_A = torch.empty(tuple(weight_A.shape), dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        local, slices = _local_view(weight_A)
        local.copy_(full_A[slices] if slices is not None else full_A)
        _local_view(module.lora_B.weight)[0].zero_()


def trainable_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((name, p) for name, p in model.named_parameters() if p.requires_grad)


@torch.no_grad()
def lora_state_dict(model: nn.Module, *, rank0_only: bool = False) -> dict[str, Tensor]:
    """The trainable tensors (adapters, and embeddings when trained) gathered in full on the CPU,
    by ft name. A collective under FSDP/TP: every rank must call it; with `rank0_only` the
    others get an empty dict."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    emit = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    state = {}
    for name, param in trainable_parameters(model):
        full = param.full_tensor() if isinstance(param, DTensor) else param
        if emit:
            state[name] = full.detach().to("cpu", copy=True)
    return state
