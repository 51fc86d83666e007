"""A tied input embedding's gradient added into the output head's gradient, in place.

When `embed_tokens.weight is lm_head.weight`, autograd makes the lookup's gradient a dense
vocab x dim tensor (zeros, then the batch's rows scattered in) and then adds it to the head's
gradient: two passes over vocab x dim, about 1.1 ms a step for a 128k x 2048 bf16 weight on
an H100. ft's fused loss makes the head's gradient as a tensor of its own during forward
(`ft.training.loss`); the lookup's backward can then add its rows into that tensor (an
accumulating `index_put_`, sorted and deterministic on CUDA) and give autograd nothing more.

The pairing is explicit: inside `tied_gradient(head_weight)`, the first lookup of that very
weight keeps a slot (`embedding`), and the fused loss hands its gradient tensor to that slot
(`hand_over`). Anything else (no context, an untied head, a DTensor weight, a loss that does not
hand over, compiled code) takes torch's own path.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class _Slot:
    """Where the fused loss leaves the head's gradient tensor for the lookup's backward."""

    __slots__ = ("gradient",)

    def __init__(self) -> None:
        self.gradient: torch.Tensor | None = None


class _Link:
    __slots__ = ("weight", "slot")

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.slot: _Slot | None = None


_current: contextvars.ContextVar[_Link | None] = contextvars.ContextVar("ft_tied_gradient", default=None)


@contextlib.contextmanager
def tied_gradient(head_weight: torch.Tensor) -> Iterator[None]:
    """Pair one forward's embedding lookup with its loss when both use `head_weight`."""
    token = _current.set(_Link(head_weight))
    try:
        yield
    finally:
        _current.reset(token)


def embedding(module: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
    """`module(tokens)`, with its weight's gradient linked to the head's where it can be."""
    link = _current.get()
    weight = module.weight
    if (link is None or link.weight is not weight or link.slot is not None or not _linkable(module)
            or not torch.is_grad_enabled()):
        return module(tokens)
    link.slot = _Slot()
    return _LinkedEmbedding.apply(weight, tokens, link.slot)


def hand_over(weight: torch.Tensor, gradient: torch.Tensor) -> bool:
    """The fused loss offers `gradient`, the tensor its backward returns for `weight`; true
    when the tied lookup will add its rows into it (and return no gradient of its own)."""
    link = _current.get()
    if link is None or link.weight is not weight or link.slot is None or link.slot.gradient is not None:
        return False
    link.slot.gradient = gradient
    return True


def _linkable(module: nn.Embedding) -> bool:
    if not module.weight.requires_grad or torch.compiler.is_compiling():
        return False
    if module.padding_idx is not None or module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return True
    return not isinstance(module.weight, DTensor)


class _LinkedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, tokens: torch.Tensor, slot: _Slot) -> torch.Tensor:
        ctx.save_for_backward(tokens)
        ctx.slot = slot
        ctx.num_weights = weight.shape[0]
        return F.embedding(tokens, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (tokens,) = ctx.saved_tensors
        gradient, ctx.slot.gradient = ctx.slot.gradient, None
        if gradient is None:  # nothing was handed over: torch's own gradient
            return torch.ops.aten.embedding_dense_backward(grad_out, tokens, ctx.num_weights, -1, False), None, None
        rows = grad_out.reshape(-1, grad_out.shape[-1]).to(gradient.dtype)
        gradient.index_put_((tokens.reshape(-1),), rows, accumulate=True)
        return None, None, None
