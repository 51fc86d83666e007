"""Where a training step's peak GPU memory goes: the allocations alive at the peak,
grouped by the Python line that made them.

`profile_peak(step, device)` runs `step()` once with the CUDA caching allocator's
history on (`torch.cuda.memory._record_memory_history`), replays the allocation
trace to find the moment of the peak, and returns the memory held before the step
(weights, optimizer states, ...) plus the step's live allocations at the peak,
largest groups first. Benchmarks call it after their timed steps (`--profile-memory`).
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import torch

GIB = 2**30
# Frames inside these paths say nothing about which model code allocated.
_PLUMBING = ("torch/utils/checkpoint.py", "torch/_ops.py", "torch/autograd/", "torch/nn/modules/module.py",
             "torch/_dynamo/", "torch/_inductor/", "torch/_functorch/", "torch/_tensor.py", "torch/amp/",
             "contextlib.py", "memory_profile.py", "torch/_library/", "torch/utils/_")


def _site(frames: list[dict[str, Any]]) -> str:
    """The innermost frame outside torch's plumbing, else the innermost frame."""
    for frame in frames:
        filename = frame.get("filename", "")
        if filename and not any(part in filename for part in _PLUMBING) and not filename.startswith("<"):
            short = "/".join(filename.split("/")[-3:])
            return f"{short}:{frame.get('line')} {frame.get('name')}"
    if frames:
        frame = frames[0]
        return f"{frame.get('filename', '?').split('/')[-1]}:{frame.get('line')} {frame.get('name')}"
    return "(no Python frame: C++ or compiled code)"


def profile_peak(step: Callable[[], Any], device: torch.device, *, top: int = 20) -> dict[str, Any]:
    if device.type != "cuda":
        return {"status": "skipped", "reason": "memory history needs CUDA"}
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        step()
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    measured_peak = torch.cuda.max_memory_allocated(device)
    events = snapshot["device_traces"][device.index or 0]

    # First pass: the moment of the peak; second: the live set then.
    live, total, peak, peak_at = {}, 0, 0, -1
    for i, event in enumerate(events):
        action = event["action"]
        if action == "alloc":
            live[event["addr"]] = event["size"]
            total += event["size"]
            if total > peak:
                peak, peak_at = total, i
        elif action == "free_completed":
            total -= live.pop(event["addr"], 0)
    alive: dict[int, dict[str, Any]] = {}
    for event in events[:peak_at + 1]:
        if event["action"] == "alloc":
            alive[event["addr"]] = event
        elif event["action"] == "free_completed":
            alive.pop(event["addr"], None)
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for event in alive.values():
        entry = groups[_site(event.get("frames", []))]
        entry[0] += event["size"]
        entry[1] += 1
    ranked = sorted(groups.items(), key=lambda item: -item[1][0])
    return {
        "status": "ok",
        "held_before_step_gib": before / GIB,
        "step_allocations_at_peak_gib": peak / GIB,
        "reconstructed_peak_gib": (before + peak) / GIB,
        "measured_peak_gib": measured_peak / GIB,
        "events": len(events),
        "top_sites": [{"site": site, "gib": size / GIB, "count": count} for site, (size, count) in ranked[:top]],
    }


def largest_tensors(module: torch.nn.Module, optimizer: Any = None, *, top: int = 10) -> list[dict[str, Any]]:
    """The largest parameters (and optimizer states), to read beside `held_before_step_gib`."""
    rows = [(name, p.numel() * p.element_size(), str(p.dtype)) for name, p in module.named_parameters()]
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, value in optimizer.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor):
                        rows.append((f"optimizer.{key}", value.numel() * value.element_size(), str(value.dtype)))
    totals: dict[tuple[str, str], int] = collections.defaultdict(int)
    for name, size, dtype in rows:
        totals[(name.split(".")[-1] if not name.startswith("optimizer.") else name, dtype)] += size
    ranked = sorted(totals.items(), key=lambda item: -item[1])
    return [{"kind": kind, "dtype": dtype, "gib": size / GIB} for (kind, dtype), size in ranked[:top]]
