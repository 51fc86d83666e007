"""Fused input projections for generation: one matmul for q/k/v, one for gate/up.

A decode step of a small model is bound by its number of kernels, not by reading
the weights: the q, k and v projections (and the MLP's gate and up projections)
read the same input, so each pair or triple can be one matmul on the concatenated
weight, its output split after. `fused_projections(model)` turns that on for the
duration of a `Generator` call; outside it the model runs exactly as built.

Memory: none beyond the model's own. The first fusion concatenates each layer's
weights into one tensor (a transient copy of one layer's projections) and makes
the original parameters views of its rows, so `q_proj.weight` and the fused
weight share storage. Parameter names, state dict keys and values are unchanged
(in-place updates, e.g. `load_state_dict`, reach both); the fused tensors are
non-persistent buffers that exist only while fusion is on. Leaving it turns the
buffers off but keeps the parameters as views, so turning it on again is free
and a captured CUDA graph keeps reading valid memory.

A module takes part when it declares the fused buffers (the Llama family's
`Attention` and `MLP`: `qkv_weight`, `qkv_bias`, `gate_up_weight`), so this file
names no family. It is skipped (with a debug log) where the fused matmul would
compute something else or could not be formed: LoRA (or any other subclass of
`nn.Linear`) on a projection, weights that are tensor subclasses (tensor-parallel
DTensors, NF4), meta tensors, mismatched dtypes or devices, or biases on some of
the projections but not all.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import Tensor, nn

log = logging.getLogger("ft")

# (fused weight buffer, fused bias buffer or None, the projections it concatenates)
FUSIONS: tuple[tuple[str, str | None, tuple[str, ...]], ...] = (
    ("qkv_weight", "qkv_bias", ("q_proj", "k_proj", "v_proj")),
    ("gate_up_weight", None, ("gate_proj", "up_proj")),
)


def fuse_projections(model: nn.Module) -> int:
    """Fill every declared fused buffer of `model` that can be filled; returns how many
    modules now run fused. Idempotent: a module already fused with its parameters still
    views of the fused tensor keeps it (after `model.to(...)` it is fused again)."""
    fused = 0
    with torch.inference_mode(False), torch.no_grad():  # never inference tensors: the model may train later
        for module_name, module in model.named_modules():
            for weight_name, bias_name, names in FUSIONS:
                if weight_name not in module._buffers:
                    continue
                linears = [getattr(module, name) for name in names]
                reason = _unfusable(linears, bias_name)
                if reason is not None:
                    log.debug("fused projections: %s runs unfused (%s)", module_name or "model", reason)
                    continue
                setattr(module, weight_name, _fused_rows([lin.weight for lin in linears]))
                if bias_name is not None:
                    biases = [lin.bias for lin in linears]
                    setattr(module, bias_name, None if biases[0] is None else _fused_rows(biases))
                fused += 1
    return fused


def unfuse_projections(model: nn.Module) -> None:
    """Turn the fused buffers off: `model` computes each projection on its own again.
    The parameters stay views of the fused tensors (same values, no memory freed)."""
    for module in model.modules():
        for weight_name, bias_name, _ in FUSIONS:
            for name in (weight_name, bias_name):
                if name is not None and module._buffers.get(name) is not None:
                    setattr(module, name, None)


@contextlib.contextmanager
def fused_projections(model: nn.Module, *, enabled: bool = True) -> Iterator[int]:
    """Within the block `model` runs its projections fused (when `enabled`); yields how
    many modules are fused."""
    if not enabled:
        unfuse_projections(model)
        yield 0
        return
    try:
        yield fuse_projections(model)
    finally:
        unfuse_projections(model)


def _unfusable(linears: list[nn.Module], bias_name: str | None) -> str | None:
    """Why these projections cannot be computed by one matmul, or None when they can."""
    for linear in linears:
        if type(linear) is not nn.Linear:  # LoRA, FP8, ...: their forward adds to the matmul
            return f"{type(linear).__name__} is not a plain nn.Linear"
        for tensor in (linear.weight, linear.bias):
            if tensor is not None and type(tensor) not in (Tensor, nn.Parameter):  # DTensor, NF4
                return f"{type(tensor).__name__} weights"
            if tensor is not None and tensor.is_meta:
                return "meta tensors"
    weights = [linear.weight for linear in linears]
    if len({(w.dtype, w.device, w.shape[1:]) for w in weights}) > 1:
        return "weights of different dtypes, devices or input sizes"
    has_bias = {linear.bias is not None for linear in linears}
    if has_bias == {True} and bias_name is None:
        return "biases the fused path does not add"
    if len(has_bias) > 1:
        return "biases on some projections only"
    return None


def _fused_rows(params: list[Tensor]) -> Tensor:
    """One tensor whose consecutive row blocks are `params`, which become views of it."""
    fused = _view_over(params)
    if fused is None:
        fused = torch.cat([p.detach() for p in params])
        offset = 0
        for param in params:
            rows = param.shape[0]
            param.data = fused[offset : offset + rows]  # same Parameter object, storage shared with `fused`
            offset += rows
    return fused


def _view_over(tensors: list[Tensor]) -> Tensor | None:
    """The concatenation of `tensors` as a view, when they already are consecutive
    contiguous blocks of one storage (a fusion done before); else None."""
    first = tensors[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for tensor in tensors:
        if not tensor.is_contiguous() or tensor.untyped_storage().data_ptr() != storage:
            return None
        if tensor.storage_offset() != offset:
            return None
        offset += tensor.numel()
    shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
    stride = torch.empty(shape, device="meta").stride()  # contiguous (a one-row block may report another)
    return first.detach().as_strided(shape, stride, first.storage_offset())


__all__ = ["FUSIONS", "fuse_projections", "fused_projections", "unfuse_projections"]
