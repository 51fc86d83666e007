"""Activation offloading: tensors saved for backward go to pinned host memory during
forward and come back when backward needs them.

`ActivationOffloading` is a pair of `torch.autograd.graph.saved_tensors_hooks`:
pack copies a saved tensor to pinned host memory on a side stream (so the copy
overlaps the next kernels) and keeps only the host copy; unpack makes the compute
stream wait for that copy and brings the tensor back. Parameters and tensors
under `min_bytes` stay where they are (copying them costs more than they save).
Bringing tensors back is not prefetched: each waits for its own host-to-device
copy, so backward is slower by roughly the PCIe time of the activations.

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
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        if not tensor.is_cuda:  # CPU runs (tests): the same round trip without streams
            return (tensor.to(self.host_device, copy=True), tensor.device, None)
        if self._stream is None:
            self._stream = torch.cuda.Stream(tensor.device)
        compute = torch.cuda.current_stream(tensor.device)
        self._stream.wait_stream(compute)  # the tensor is complete
        with torch.cuda.stream(self._stream):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            event = self._stream.record_event()
        tensor.record_stream(self._stream)  # its memory is not reused before the copy is done
        return (host, tensor.device, event)

    @staticmethod
    def _unpack(packed: Any) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        host, device, event = packed
        if event is None:
            return host.to(device, copy=True)
        torch.cuda.current_stream(device).wait_event(event)
        return host.to(device, non_blocking=True)


def offloading_loss_fn(loss_fn: LossFn, *, enabled: bool, device: torch.device) -> LossFn:
    """`loss_fn` with its forward's saved activations offloaded (CUDA only)."""
    if not enabled or device.type != "cuda":
        return loss_fn

    def offloaded(model, batch, device):
        with ActivationOffloading():
            return loss_fn(model, batch, device)

    return offloaded
