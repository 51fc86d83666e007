"""The preference training step: per-pair normalisation, metrics, validation.

`ft.training.step.accumulate_gradients` divides by the target tokens of a step;
a preference loss is a mean over pairs, so here each micro-batch's summed pair
loss is divided by the pairs of the whole step over all dp ranks (times dp size:
FSDP and DDP average gradients). dp=N then updates exactly as one process with
gradient_accumulation=N does.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ft.gang import Gangs
from ft.preference.criteria import CriterionConfig, chosen_nll, pair_losses
from ft.preference.logprobs import batch_sequence_logprobs

# Summed per pair between publishes, published as means over pairs.
METRICS = ("chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy",
           "chosen_logp", "rejected_logp", "chosen_nll", "rejected_nll")

# (model, batch, device) -> (summed pair loss, summed METRICS): both on device.
PairLossFn = Callable[[nn.Module, Any, torch.device], tuple[torch.Tensor, torch.Tensor]]


def preference_loss(criterion: CriterionConfig, *, chunk_size: int,
                    reference_P2: torch.Tensor | None) -> PairLossFn:
    """The loss of a batch of pairs; `reference_P2` holds every pair's reference
    log-probs (chosen, rejected) when the criterion needs them."""

    def loss_fn(model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        policy_S, counts_S = batch_sequence_logprobs(model, batch, device, chunk_size=chunk_size)
        reference_S = None
        if reference_P2 is not None:
            reference_S = reference_P2.index_select(0, batch.pair_index_P).flatten().to(device, non_blocking=True)
        out = pair_losses(criterion, policy_S, counts_S, reference_S)
        with torch.no_grad():
            policy, lengths = policy_S.view(-1, 2), counts_S.view(-1, 2)
            margin = out.chosen_reward - out.rejected_reward
            metrics_MP = torch.stack([
                out.chosen_reward, out.rejected_reward, margin, (margin > 0).float(),
                policy[:, 0], policy[:, 1], chosen_nll(policy, lengths), chosen_nll(policy.flip(1), lengths.flip(1)),
            ])
        return out.loss.sum(), metrics_MP.sum(dim=1)

    return loss_fn


@dataclasses.dataclass
class PreferenceStats:
    """Sums over the steps since the last publish (device-side: no host sync per step).
    `targets` counts pairs, the loss's unit (the name `NonFiniteGuard` reads)."""

    loss_sum: torch.Tensor
    metric_sums: torch.Tensor
    targets: int = 0
    target_tokens: int = 0
    tokens: int = 0
    computed_tokens: int = 0
    steps: int = 0
    grad_norm: float = 0.0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    @classmethod
    def zero(cls, device: torch.device) -> PreferenceStats:
        return cls(loss_sum=torch.zeros((), device=device), metric_sums=torch.zeros(len(METRICS), device=device))

    def count(self, batch) -> None:
        self.targets += batch.num_pairs
        self.target_tokens += batch.num_target_tokens
        self.tokens += batch.num_tokens
        self.computed_tokens += batch.tokens_BT.numel()


def accumulate_pair_gradients(model: nn.Module, batches: Sequence, *, gangs: Gangs, autocast, scaler,
                              loss_fn: PairLossFn, stats: PreferenceStats) -> torch.Tensor:
    """Forward and backward over one optimizer step's micro-batches; returns this rank's
    summed pair loss of the step (on device, also added to `stats`)."""
    step_pairs = torch.tensor(sum(b.num_pairs for b in batches), dtype=torch.int64)
    gangs.dp.all_reduce(step_pairs)  # on the host: gloo serves CPU tensors on GPU runs too
    norm = gangs.dp.size / max(int(step_pairs), 1)
    step_loss = torch.zeros((), device=gangs.device)
    for batch in batches:
        stats.count(batch)
        with autocast:
            loss_sum, metric_sums = loss_fn(model, batch, gangs.device)
        scaler.scale(loss_sum * norm).backward()
        step_loss += loss_sum.detach()
        stats.metric_sums += metric_sums
    stats.loss_sum += step_loss
    return step_loss


def publish_preference_stats(stats: PreferenceStats, gangs: Gangs, *, lr: float, peak_tflops: float | None,
                             flops_per_token: int, epoch: int) -> dict[str, Any]:
    """Means per pair over the dp ranks (a collective), tokens/s over chosen + rejected tokens, MFU."""
    elapsed = time.perf_counter() - stats.start
    sums = torch.cat([stats.loss_sum.double()[None], stats.metric_sums.double(),
                      torch.tensor([stats.targets, stats.target_tokens, stats.tokens, stats.computed_tokens],
                                   dtype=torch.float64, device=stats.loss_sum.device)])
    gangs.dp.all_reduce(sums)
    values = sums.tolist()
    pairs, target_tokens, tokens, computed = values[-4:]
    mean = (lambda x: x / pairs) if pairs else (lambda x: float("nan"))  # nan: every step skipped
    out: dict[str, Any] = {"loss": mean(values[0])}
    out.update({name: mean(v) for name, v in zip(METRICS, values[1:1 + len(METRICS)])})
    out.update({
        "lr": lr, "grad_norm": stats.grad_norm, "pairs": int(pairs), "target_tokens_per_s": target_tokens / elapsed,
        "tokens_per_s": tokens / elapsed, "epoch": epoch + 1, "elapsed_s": elapsed,
    })
    if peak_tflops is not None:
        out["mfu"] = computed * flops_per_token / elapsed / (peak_tflops * 1e12 * gangs.root.size)
    if gangs.device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(gangs.device) / 2**30
        torch.cuda.reset_peak_memory_stats(gangs.device)
    return out


def validate_pairs(model: nn.Module, batches: Iterable, *, gangs: Gangs, autocast,
                   loss_fn: PairLossFn) -> dict[str, Any]:
    """Mean loss and metrics per pair over `batches` (this rank's share of a split)."""
    model.eval()
    sums = torch.zeros(2 + len(METRICS), dtype=torch.float64, device=gangs.device)
    with torch.no_grad(), autocast:
        for batch in batches:
            loss_sum, metric_sums = loss_fn(model, batch, gangs.device)
            sums[0] += loss_sum.double()
            sums[1:-1] += metric_sums.double()
            sums[-1] += batch.num_pairs
    gangs.dp.all_reduce(sums)
    model.train()
    values = sums.tolist()
    pairs = max(values[-1], 1)
    out = {"loss": values[0] / pairs, "pairs": int(values[-1])}
    out.update({name: v / pairs for name, v in zip(METRICS, values[1:-1])})
    return out
