"""The pieces of one training step, shared by every recipe and the benchmarks:
`accumulate_gradients` (forward + backward over a step's micro-batches),
`optimizer_step` (unscale, clip, step, schedule) and `validate`.

A recipe supplies its loss as `loss_fn(model, batch, device) -> summed loss` (a 0-d
tensor, summed over the batch's `num_target_tokens`); the batch arrives on the host,
so the loss can derive index tensors there (no device sync) before moving it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ft.gang import Gangs
from ft.models.tied_embedding import tied_gradient
from ft.training.loss import chunked_cross_entropy_sum, target_positions
from ft.training.optim import clip_coefficient, clip_grad_norm
from ft.training.step_stats import StepStats

LossFn = Callable[[nn.Module, Any, torch.device], torch.Tensor]


def next_token_loss(loss_chunk_size: int) -> LossFn:
    """Summed next-token cross-entropy over a batch's target tokens, computed in chunks
    through `model.lm_head` so the full [tokens, vocab] logits never exist at once."""

    def loss_fn(model: nn.Module, batch, device: torch.device) -> torch.Tensor:
        # Target positions come from the host labels: a nonzero() on the device would sync.
        target_index_N = target_positions(batch.labels_BT).to(device, non_blocking=True)
        batch = batch.to(device, non_blocking=True)
        # A tied embedding's gradient goes straight into the head's (ft.models.tied_embedding).
        with tied_gradient(model.lm_head.weight):
            hidden = model(batch.tokens_BT, positions_BT=batch.positions_BT, document_ids_BT=batch.document_ids_BT,
                           return_hidden=True)
            return chunked_cross_entropy_sum(hidden, model.lm_head, batch.labels_BT, chunk_size=loss_chunk_size,
                                             target_index_N=target_index_N)

    return loss_fn


def accumulate_gradients(model: nn.Module, batches: Sequence, *, gangs: Gangs, autocast, scaler,
                         loss_fn: LossFn, stats: StepStats) -> torch.Tensor:
    """Forward and backward over one optimizer step's micro-batches; returns this
    rank's summed loss of the step (on device, also added to `stats`).

    Each micro-batch's loss is summed over its target tokens and divided by the
    target tokens of the whole step on all dp ranks, so the gradient does not depend
    on how the step is split into micro-batches or ranks.
    """
    device = gangs.device
    # Counted and reduced on the host (gloo serves CPU tensors on GPU runs too), so
    # the step never waits for the device.
    step_targets = torch.tensor(sum(b.num_target_tokens for b in batches), dtype=torch.int64)
    gangs.dp.all_reduce(step_targets)
    # FSDP/DDP average gradients over dp ranks; scaling by dp.size makes it a sum.
    norm = gangs.dp.size / max(int(step_targets), 1)
    step_loss = torch.zeros((), device=device)
    for batch in batches:
        stats.count(batch)
        with autocast:
            loss_sum = loss_fn(model, batch, device)
        scaler.scale(loss_sum * norm).backward()
        step_loss += loss_sum.detach()
    stats.loss_sum += step_loss
    return step_loss


def optimizer_step(model: nn.Module, optimizer, scheduler, scaler, *, max_grad_norm: float | None,
                   skip_if: Callable[[torch.Tensor], bool] | None = None,
                   clip: Callable[[nn.Module, float | None], torch.Tensor] = clip_grad_norm) -> torch.Tensor:
    """Unscale, clip, step, schedule; returns the gradient norm before clipping (on device).

    `skip_if(grad_norm)` true: this step makes no update (gradients dropped, no
    optimizer step); the schedule still advances. `clip`: the norm-and-clip function
    (a pipeline's reduces over its stages). Where the optimizer can divide the gradients
    itself (`clip_folds_into_step`), the clipping factor goes to it instead of a pass
    that rewrites every gradient.
    """
    scaler.unscale_(optimizer)
    fold = max_grad_norm is not None and clip is clip_grad_norm and clip_folds_into_step(optimizer, scaler)
    grad_norm = clip(model, None if fold else max_grad_norm)
    if skip_if is not None and skip_if(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        scaler.update()
        scheduler.step()
        return grad_norm
    if fold:
        # torch's fused Adam/AdamW (and CompiledAdamW) divide each gradient by `grad_scale`
        # inside the step (the hook GradScaler uses): dividing by 1/coef is clipping by coef, computed in float32.
        optimizer.grad_scale = 1.0 / clip_coefficient(grad_norm, max_grad_norm)
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale
    else:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return grad_norm


def clip_folds_into_step(optimizer, scaler) -> bool:
    """Whether `optimizer` can take the clipping factor itself, with no loss scaler (which
    uses the same hook): `CompiledAdamW` (it steps local shards, so DTensors too), or
    torch's fused Adam or AdamW over plain tensors (not DTensors: the factor is a plain
    tensor)."""
    from ft.training.compiled_adamw import CompiledAdamW

    if scaler.is_enabled():
        return False
    if isinstance(optimizer, CompiledAdamW):
        return True
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    if not all(group.get("fused") for group in optimizer.param_groups):
        return False
    from torch.distributed.tensor import DTensor

    return not any(isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"])


def validate(model: nn.Module, batches: Iterable, *, gangs: Gangs, autocast, loss_fn: LossFn) -> dict[str, Any]:
    """Mean loss per target token over `batches` (this rank's share of a validation split)."""
    model.eval()
    loss_sum = torch.zeros((), device=gangs.device)
    targets = torch.zeros((), device=gangs.device, dtype=torch.int64)
    with torch.no_grad(), autocast:
        for batch in batches:
            targets += batch.num_target_tokens
            loss_sum += loss_fn(model, batch, gangs.device)
    gangs.dp.all_reduce(loss_sum)
    gangs.dp.all_reduce(targets)
    model.train()
    return {"loss": float(loss_sum) / max(int(targets), 1), "target_tokens": int(targets)}
