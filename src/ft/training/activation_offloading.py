"""Activation offloading: tensors saved for backward go to pinned host memory during
forward and come back when backward needs them.

`ActivationOffloading` is a pair of `torch.autograd.graph.saved_tensors_hooks`:
pack copies a saved tensor to pinned host memory on a side stream (so the copy
overlaps the next kernels) and keeps only the host copy; unpack makes the compute
stream wait for that copy and brings the tensor back. Parameters and tensors
under `min_bytes` stay where they are (copying them costs more than they save).

Backward prefetches: when it brings a tensor back, it also starts copying back,
on the side stream, the tensors saved just before it (about as many bytes), which
backward needs next since it walks the forward in reverse. Those copies overlap
the current block's backward instead of stalling the next one.

A tensor comes back with the size and strides it was saved with: a compiled
block's backward checks them (attention saves q, k, v as transposed views), so
the host copy is allocated with the same strides, which also makes each copy one
flat memcpy. Only tensors whose elements fill their span of storage exactly once
(contiguous, transposed, permuted) are offloaded; a view with gaps or repeats (a
slice, an expand) stays on the device: copying its elements would change its
strides, and copying its storage span can move far more than the view holds and
frees nothing while the tensor it was cut from is alive.

Under activation checkpointing, what a checkpointed block saves inside goes
through the checkpoint's own hooks (the innermost hooks win) and is recomputed,
but the block's inputs are saved outside them (`torch.utils.checkpoint` keeps its
inputs as saved tensors, eager or compiled), so these hooks offload them. With
`activation_checkpointing=full` that is everything the blocks keep: forward leaves
no block input on the GPU, and backward brings each back for its block's recompute
(the next one prefetched), so activation memory no longer grows with depth.

`offloading_loss_fn(loss_fn)` wraps a recipe's loss so its forward runs under the
hooks; on a CPU it returns `loss_fn` unchanged (there is no host memory to move to).
"""

from __future__ import annotations

import weakref
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


class Offloaded:
    """One saved tensor's host copy, as autograd holds it between forward and backward.
    `event`: the device-to-host copy's completion (None on a CPU); `prefetched`: the
    device copy backward's prefetch started, and its event, until unpack takes it."""

    __slots__ = ("host", "device", "nbytes", "index", "event", "prefetched", "unpacked", "__weakref__")

    def __init__(self, host: Tensor, device: torch.device, nbytes: int, index: int, event: Any) -> None:
        self.host, self.device, self.nbytes, self.index, self.event = host, device, nbytes, index, event
        self.prefetched: tuple[Tensor, Any] | None = None
        self.unpacked = False


class ActivationOffloading(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self, *, min_bytes: int = 1 << 20, host_device: str = "cpu", prefetch: bool = True) -> None:
        self.min_bytes = min_bytes
        self.host_device = torch.device(host_device)
        self.prefetch = prefetch
        self.offloaded_bytes = 0
        self.prefetched_bytes = 0  # of those, brought back ahead of their unpack
        # Weak, in pack order: autograd owns the records and drops each with its graph.
        self._saved: list[weakref.ref[Offloaded]] = []
        self._in_flight_bytes = 0
        self._stream = None
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: Tensor) -> Any:
        if isinstance(tensor, nn.Parameter) or tensor.numel() * tensor.element_size() < self.min_bytes:
            return tensor
        if not is_dense(tensor):  # a slice or an expand: see the module's docstring
            return tensor
        nbytes = tensor.numel() * tensor.element_size()
        self.offloaded_bytes += nbytes
        if not tensor.is_cuda:  # CPU runs (tests): the same round trip without streams
            host, event = strided_copy(tensor, self.host_device), None
        else:
            stream = self._side_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is complete
            with torch.cuda.stream(stream):
                host = strided_copy(tensor, self.host_device, pin_memory=True, non_blocking=True)
                event = stream.record_event()
            tensor.record_stream(stream)  # its memory is not reused before the copy is done
        record = Offloaded(host, tensor.device, nbytes, len(self._saved), event)
        self._saved.append(weakref.ref(record))
        return record

    def _unpack(self, packed: Any) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        record: Offloaded = packed
        if record.prefetched is not None:
            tensor, event = record.prefetched
            record.prefetched = None
            self._in_flight_bytes -= record.nbytes
            if event is not None:
                torch.cuda.current_stream(record.device).wait_event(event)
        elif record.event is None:
            tensor = strided_copy(record.host, record.device)
        else:
            torch.cuda.current_stream(record.device).wait_event(record.event)
            tensor = strided_copy(record.host, record.device, non_blocking=True)
        first = not record.unpacked
        record.unpacked = True
        if self.prefetch and first:
            self._prefetch_before(record)
        return tensor

    def _prefetch_before(self, record: Offloaded) -> None:
        """Start bringing back the tensors saved just before `record` (backward's next), until
        about `record`'s bytes are on their way."""
        for ref in reversed(self._saved[:record.index]):
            if self._in_flight_bytes >= record.nbytes:
                return
            earlier = ref()
            if earlier is None or earlier.unpacked or earlier.prefetched is not None:
                continue
            earlier.prefetched = self._copy_back_early(earlier)
            self._in_flight_bytes += earlier.nbytes
            self.prefetched_bytes += earlier.nbytes

    def _copy_back_early(self, record: Offloaded) -> tuple[Tensor, Any]:
        host = record.host
        if record.event is None:
            return strided_copy(host, record.device), None
        compute = torch.cuda.current_stream(record.device)
        # Allocated on the compute stream, which uses and frees it; the side stream only
        # fills it, after the compute work queued so far (which may still use that memory).
        copy = torch.empty_strided(host.shape, host.stride(), dtype=host.dtype, device=record.device)
        stream = self._side_stream(record.device)
        stream.wait_stream(compute)
        with torch.cuda.stream(stream):
            copy.copy_(host, non_blocking=True)  # after the offload on the same stream
            event = stream.record_event()
        return copy, event

    def _side_stream(self, device: torch.device) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream


def offloading_loss_fn(loss_fn: LossFn, *, enabled: bool, device: torch.device) -> LossFn:
    """`loss_fn` with its forward's saved activations offloaded (CUDA only)."""
    if not enabled or device.type != "cuda":
        return loss_fn

    def offloaded(model, batch, device):
        with ActivationOffloading():
            return loss_fn(model, batch, device)

    return offloaded
