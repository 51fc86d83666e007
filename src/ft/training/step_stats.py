"""`StepStats`: what a training loop sums between two metric publishes, and
`publish_stats`, which turns them into the published values (loss, throughput, MFU).

The first steps of a run (or of a resumed run) compile the model, grow the
allocator and create the optimizer state; they are warm-up, not the run's speed.
Throughput and MFU are computed over steady-state steps only; the warm-up's time is
published on its own as `warmup_s`, and a window of nothing but warm-up publishes
no throughput at all.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from ft.gang import Gangs


@dataclasses.dataclass
class StepStats:
    """Sums over the steps since the last publish (the loss stays on device: no host
    sync per step)."""

    loss_sum: torch.Tensor
    targets: int = 0
    tokens: int = 0
    computed_tokens: int = 0
    examples: int = 0
    steps: int = 0
    grad_norm: float = 0.0
    start: float = dataclasses.field(default_factory=time.perf_counter)
    warmup_steps: int = 0
    """The first `warmup_steps` steps of this window are warm-up (see the module docstring)."""
    steady_from: tuple[float, int, int, int] | None = None
    """(time, targets, tokens, computed_tokens) when the warm-up ended."""

    @classmethod
    def zero(cls, device: torch.device, *, warmup_steps: int = 0) -> StepStats:
        return cls(loss_sum=torch.zeros((), device=device), warmup_steps=warmup_steps)

    def finish_step(self) -> None:
        """Count a finished optimizer step; the last warm-up step starts the steady clock."""
        self.steps += 1
        if self.steps == self.warmup_steps:
            if self.loss_sum.device.type == "cuda":  # the warm-up's kernels belong to the warm-up
                torch.cuda.synchronize(self.loss_sum.device)
            self.steady_from = (time.perf_counter(), self.targets, self.tokens, self.computed_tokens)

    def count(self, batch) -> None:
        """Add a micro-batch's token counts (host-side numbers of the batch)."""
        self.targets += batch.num_target_tokens
        self.tokens += batch.num_tokens
        self.computed_tokens += batch.tokens_BT.numel()
        self.examples += batch.num_examples


def publish_stats(stats: StepStats, gangs: Gangs, *, lr: float, peak_tflops: float | None, flops_per_token: int,
                  epoch: int) -> dict[str, Any]:
    """The metrics of the steps in `stats`, summed over the dp ranks (a collective)."""
    now = time.perf_counter()
    elapsed = now - stats.start
    steady = stats.steady_from or (stats.start, 0, 0, 0)
    all_warmup = stats.steps <= stats.warmup_steps
    sums = torch.tensor([float(stats.loss_sum), stats.targets, stats.tokens, stats.computed_tokens, stats.examples,
                         stats.targets - steady[1], stats.tokens - steady[2], stats.computed_tokens - steady[3]],
                        dtype=torch.float64, device=gangs.device)
    gangs.dp.all_reduce(sums)
    loss_sum, targets, tokens, computed, examples, steady_targets, steady_tokens, steady_computed = sums.tolist()
    values: dict[str, Any] = {
        "loss": loss_sum / targets if targets else float("nan"),  # nan: every step skipped (nonfinite_policy)
        "lr": lr,
        "grad_norm": stats.grad_norm,
    }
    steady_elapsed = now - steady[0]
    if not all_warmup:
        values["target_tokens_per_s"] = steady_targets / steady_elapsed
        values["tokens_per_s"] = steady_tokens / steady_elapsed
        if peak_tflops is not None:
            # Tensor-parallel ranks share the work of one dp rank, so the peak counts every GPU.
            values["mfu"] = steady_computed * flops_per_token / steady_elapsed / (peak_tflops * 1e12 * gangs.root.size)
    values["examples"] = int(examples)
    values["epoch"] = epoch + 1
    values["elapsed_s"] = elapsed
    if stats.warmup_steps:
        values["warmup_s"] = elapsed if all_warmup else steady[0] - stats.start
    if gangs.device.type == "cuda":
        values["peak_memory_gib"] = torch.cuda.max_memory_allocated(gangs.device) / 2**30
        values["peak_reserved_memory_gib"] = torch.cuda.max_memory_reserved(gangs.device) / 2**30
        # Times the allocator found no free block, emptied its cache and retried (since the
        # start): each one synchronizes, so a run near its memory limit shows here first.
        values["alloc_retries"] = torch.cuda.memory_stats(gangs.device).get("num_alloc_retries", 0)
        torch.cuda.reset_peak_memory_stats(gangs.device)
    return values
