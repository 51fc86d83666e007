"""`StepStats`: what a training loop sums between two metric publishes, and
`publish_stats`, which turns them into the published values (loss, throughput, MFU)."""

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

    @classmethod
    def zero(cls, device: torch.device) -> StepStats:
        return cls(loss_sum=torch.zeros((), device=device))

    def count(self, batch) -> None:
        """Add a micro-batch's token counts (host-side numbers of the batch)."""
        self.targets += batch.num_target_tokens
        self.tokens += batch.num_tokens
        self.computed_tokens += batch.tokens_BT.numel()
        self.examples += batch.num_examples


def publish_stats(stats: StepStats, gangs: Gangs, *, lr: float, peak_tflops: float | None, flops_per_token: int,
                  epoch: int) -> dict[str, Any]:
    """The metrics of the steps in `stats`, summed over the dp ranks (a collective)."""
    elapsed = time.perf_counter() - stats.start
    sums = torch.tensor([float(stats.loss_sum), stats.targets, stats.tokens, stats.computed_tokens, stats.examples],
                        dtype=torch.float64, device=gangs.device)
    gangs.dp.all_reduce(sums)
    loss_sum, targets, tokens, computed, examples = sums.tolist()
    values: dict[str, Any] = {
        "loss": loss_sum / targets if targets else float("nan"),  # nan: every step skipped (nonfinite_policy)
        "lr": lr,
        "grad_norm": stats.grad_norm,
        "target_tokens_per_s": targets / elapsed,
        "tokens_per_s": tokens / elapsed,
        "examples": int(examples),
        "epoch": epoch + 1,
        "elapsed_s": elapsed,
    }
    if peak_tflops is not None:
        # Tensor-parallel ranks share the work of one dp rank, so the peak counts every GPU.
        values["mfu"] = computed * flops_per_token / elapsed / (peak_tflops * 1e12 * gangs.root.size)
    if gangs.device.type == "cuda":
        values["peak_memory_gib"] = torch.cuda.max_memory_allocated(gangs.device) / 2**30
        torch.cuda.reset_peak_memory_stats(gangs.device)
    return values
