"""Checkpoint writes off the training loop's critical path.

A save has a short part that must happen on the loop's thread, in step with the
other ranks (gathering sharded weights, copying the state out of the GPU), and a
long part that only touches the host and the disk (serialising, fsync, the
manifest's sha256 of every file, the atomic rename, pruning). `BackgroundSaver`
runs the long part on one worker thread; `CpuStager` makes the copies the worker
writes, into pinned host buffers that are reused from one save to the next.

Only one save is ever in flight: the next save, and the end of the run, wait for
the previous one and re-raise its error. A process killed while the worker writes
leaves `step_N.tmp` (with ft's marker), which the next start removes: the
atomic-rename guarantee of `ft.training.checkpoint` is unchanged.
"""

from __future__ import annotations

import copy
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

log = logging.getLogger("ft")


class CpuStager:
    """Copies a (nested dict/list) state of tensors to host memory that the training
    loop will not touch again: pinned buffers when the state is on an accelerator
    (one device sync for the whole state), reused across saves by their position
    in the state; non-tensor leaves are deep-copied (optimizer hyper-parameters
    change every step). A tensor subclass (torchao's quantized optimizer states)
    is staged as the same subclass over host copies of its inner tensors: copying
    it into a plain buffer would dequantize it, and the resumed run would differ."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    @staticmethod
    def layout(state: Any, path: str = "") -> dict[str, tuple[torch.Size, torch.dtype, bool]]:
        """{path: (shape, dtype, pinned)} of the buffers `stage(state)` will copy into."""
        if is_traceable_wrapper_subclass(state):
            names, _ = state.__tensor_flatten__()
            return {p: spec for name in names
                    for p, spec in CpuStager.layout(getattr(state, name), f"{path}.{name}").items()}
        if isinstance(state, torch.Tensor):
            return {path: (state.shape, state.dtype, state.device.type == "cuda")}
        items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) \
            else ()
        return {p: spec for key, item in items for p, spec in CpuStager.layout(item, f"{path}/{key}").items()}

    def reserve(self, layout: dict[str, tuple[torch.Size, torch.dtype, bool]]) -> None:
        """Allocate the buffers of `layout` ahead of the first save: pinning gigabytes of
        host memory takes seconds, which belong on a worker thread, not in a save's pause."""
        for path, (shape, dtype, pin) in layout.items():
            buffer = self._buffers.get(path)
            if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
                self._buffers[path] = torch.empty(shape, dtype=dtype, device="cpu", pin_memory=pin)

    def stage(self, state: Any) -> Any:
        synchronize: set[torch.device] = set()
        staged = self._copy(state, "", synchronize)
        for device in synchronize:
            torch.cuda.synchronize(device)
        return staged

    def _copy(self, value: Any, path: str, synchronize: set[torch.device]) -> Any:
        if isinstance(value, torch.Tensor):
            return self._copy_tensor(value, path, synchronize)
        if isinstance(value, dict):
            return {key: self._copy(item, f"{path}/{key}", synchronize) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            items = [self._copy(item, f"{path}/{i}", synchronize) for i, item in enumerate(value)]
            return type(value)(items) if isinstance(value, list) else tuple(items)
        return copy.deepcopy(value)

    def _copy_tensor(self, tensor: torch.Tensor, path: str, synchronize: set[torch.device]) -> torch.Tensor:
        tensor = tensor.detach()
        if is_traceable_wrapper_subclass(tensor):
            names, context = tensor.__tensor_flatten__()
            inner = {name: self._copy_tensor(getattr(tensor, name), f"{path}.{name}", synchronize) for name in names}
            return type(tensor).__tensor_unflatten__(inner, context, tensor.size(), tensor.stride())
        pin = tensor.device.type == "cuda"
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
            self._buffers[path] = buffer
        buffer.copy_(tensor, non_blocking=pin)
        if pin:
            synchronize.add(tensor.device)
        return buffer


class BackgroundSaver:
    """One worker thread running the disk half of checkpoint saves, one at a time."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ft-checkpoint")
        self._pending: tuple[int | None, Future] | None = None

    def submit(self, step: int, write: Callable[[], None]) -> None:
        self.wait()

        def write_and_log() -> None:
            write()
            log.info("saved checkpoint step_%d", step)

        self._pending = (step, self._executor.submit(write_and_log))

    def run(self, job: Callable[[], None]) -> None:
        """Run `job` (not a save) on the worker thread; the next save waits for it."""
        self.wait()
        self._pending = (None, self._executor.submit(job))

    @property
    def pending_step(self) -> int | None:
        return self._pending[0] if self._pending is not None else None

    def wait(self) -> None:
        """Block until the save in flight is written; re-raise its error."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        if not future.done() and step is not None:
            log.info("waiting for checkpoint step_%d to finish writing", step)
        future.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)


def layout_bytes(layout: dict[str, tuple[torch.Size, torch.dtype, bool]]) -> int:
    return sum(shape.numel() * dtype.itemsize for shape, dtype, _ in layout.values())


def available_host_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
