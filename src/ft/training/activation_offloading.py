"""Activation offloading: tensors saved for backward go to pinned host memory during
forward and come back when backward needs them.

`ActivationOffloading` is a pair of `torch.autograd.graph.saved_tensors_hooks`:
pack copies a saved tensor to pinned host memory on a side stream (so the copy
overlaps the next kernels) and keeps only the host copy; unpack makes the compute
stream wait for that copy and brings the tensor back. Parameters and tensors
under `min_bytes` stay where they are (copying them costs more than they save).
Bringing tensors back is not prefetched: each waits for its own host-to-device
copy, so backward is slower by roughly the PCIe time of the activations.

A tensor comes back with the size and strides it was saved with: a compiled
block's backward checks them (attention saves q, k, v as transposed views), so
the host copy is allocated with the same strides, which also makes each copy one
flat memcpy. Only tensors whose elements fill their span of storage exactly once
(contiguous, transposed, permuted) are offloaded; a view with gaps or repeats (a
slice, an expand) stays on the device: copying its elements would change its
strides, and copying its storage span can move far more than the view holds and
frees nothing while the tensor it was cut from is alive.

Under activation checkpointing, the checkpointed blocks save through their own
hooks (the innermost hooks win), so only what is saved outside them is offloaded;
offloading pays off with `activation_checkpointing=none` or `selective`.

`offloading_loss_fn(loss_fn)` wraps a recipe's loss so its forward runs under the
hooks; on a CPU it returns `loss_fn` unchanged (there is no host memory to move to).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ft.training.step import LossFn


def is_dense(tensor: Tensor) -> bool:
    """Whether `tensor`'s elements fill a block of its storage exactly once, in some order of its dims."""
    expected = 1
    for size, stride in sorted(((n, st) for n, st in zip(tensor.shape, tensor.stride()) if n != 1),
                               key=lambda pair: pair[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def strided_copy(tensor: Tensor, device: torch.device, *, pin_memory: bool = False,
                 non_blocking: bool = False) -> Tensor:
    """A copy of the dense `tensor` on `device` with its size and strides (storage offset 0)."""
    copy = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device,
                               pin_memory=pin_memory)
    return copy.copy_(tensor, non_blocking=non_blocking)


class ActivationOffloading(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self, *, min_bytes: int = 1 << 20, host_device: str = "cpu") -> None:
        self.min_bytes = min_bytes
        self.host_device = torch.device(host_device)
        self.offloaded_bytes = 0
        self._stream = None
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: Tensor) -> Any:
        if isinstance(tensor, nn.Parameter) or tensor.numel() * tensor.element_size() < self.min_bytes:
            return tensor
        if not is_dense(tensor):  # a slice or an expand: see the module's docstring
            return tensor
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        if not tensor.is_cuda:  # CPU runs (tests): the same round trip without streams
            return (strided_copy(tensor, self.host_device), tensor.device, None)
        if self._stream is None:
            self._stream = torch.cuda.Stream(tensor.device)
        compute = torch.cuda.current_stream(tensor.device)
        self._stream.wait_stream(compute)  # the tensor is complete
        with torch.cuda.stream(self._stream):
            host = strided_copy(tensor, self.host_device, pin_memory=True, non_blocking=True)
            event = self._stream.record_event()
        tensor.record_stream(self._stream)  # its memory is not reused before the copy is done
        return (host, tensor.device, event)

    @staticmethod
    def _unpack(packed: Any) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        host, device, event = packed
        if event is None:
            return strided_copy(host, device)
        torch.cuda.current_stream(device).wait_event(event)
        return strided_copy(host, device, non_blocking=True)


def offloading_loss_fn(loss_fn: LossFn, *, enabled: bool, device: torch.device) -> LossFn:
    """`loss_fn` with its forward's saved activations offloaded (CUDA only)."""
    if not enabled or device.type != "cuda":
        return loss_fn

    def offloaded(model, batch, device):
        with ActivationOffloading():
            return loss_fn(model, batch, device)

    return offloaded
