"""AdamW, the learning-rate schedule (warm-up, then cosine, linear or constant) and
gradient-norm clipping that works on any mix of plain and sharded gradients.

Schedules are registered by name (`lr_schedule=`) in `LR_SCHEDULES`, by
`register_lr_schedules`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from ft.registry import Registry


def build_optimizer(
    model: nn.Module,
    *,
    learning_rate: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    implementation: str = "fused",
) -> torch.optim.AdamW:
    """AdamW with no decay on norms and biases (1-D parameters), as is standard for LLMs.

    `implementation`: "fused" (torch's fused kernel on GPU, foreach on CPU) or
    "compiled" (`ft.training.compiled_adamw.CompiledAdamW`, the same rule and state)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if implementation == "compiled":
        from ft.training.compiled_adamw import CompiledAdamW

        return CompiledAdamW(groups, lr=learning_rate, betas=betas, eps=eps)
    if implementation != "fused":
        raise ValueError(f"unknown AdamW implementation {implementation!r}: fused or compiled")
    on_cuda = any(p.is_cuda for p in decay + no_decay)
    # fused AdamW is one kernel for all parameters on GPU; foreach is the fast path on CPU.
    kwargs = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, **kwargs)


# The multiplier after warm-up: (progress from 0 to 1, final_lr_scale) -> factor.
LrSchedule = Callable[[float, float], float]


def _constant(progress: float, final_lr_scale: float) -> float:
    return 1.0


def _linear(progress: float, final_lr_scale: float) -> float:
    return 1.0 - (1.0 - final_lr_scale) * progress


def _cosine(progress: float, final_lr_scale: float) -> float:
    return final_lr_scale + (1.0 - final_lr_scale) * 0.5 * (1.0 + math.cos(math.pi * progress))


def register_lr_schedules(schedules: Registry[LrSchedule]) -> None:
    schedules.register("constant", _constant)
    schedules.register("linear", _linear)
    schedules.register("cosine", _cosine)


LR_SCHEDULES: Registry[LrSchedule] = Registry("lr schedule")
register_lr_schedules(LR_SCHEDULES)


def lr_multiplier(step: int, *, schedule: str, warmup_steps: int, max_num_steps: int, final_lr_scale: float) -> float:
    """The factor on the base learning rate for optimizer step `step` (0-based)."""
    shape = LR_SCHEDULES.get(schedule, key="lr_schedule")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_num_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return shape(progress, final_lr_scale)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    schedule: str,
    warmup_steps: int,
    max_num_steps: int,
    final_lr_scale: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    def multiplier(step: int) -> float:
        return lr_multiplier(
            step, schedule=schedule, warmup_steps=warmup_steps, max_num_steps=max_num_steps, final_lr_scale=final_lr_scale
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def clip_coefficient(grad_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ factor, without a host sync: min(1, max_norm / (norm + 1e-6))."""
    return torch.clamp(max_norm / (grad_norm.float() + 1e-6), max=1.0)


def clip_grad_norm(model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    """Clip to `max_norm` (None: only measure) and return the global gradient norm.

    Under TP, and FSDP x TP, the gradients are a mix of plain tensors (replicated
    RMSNorm weights under TP alone) and DTensors on different meshes (2-D dp x tp for
    the projections, the 1-D dp sub-mesh for the norms), which one `clip_grad_norm_`
    cannot take. Each (mesh, placements) group is reduced on its own mesh, and the
    scale is applied to the local shards.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    groups: dict[Any, list[torch.Tensor]] = {}
    for grad in grads:
        key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None
        groups.setdefault(key, []).append(grad)
    total_sq = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else None)
    for key, group in groups.items():
        norm = torch.nn.utils.get_total_norm(group, 2.0, foreach=True)
        if isinstance(norm, DTensor):  # a partial norm: reduce it over the shards
            norm = norm.full_tensor()
        total_sq += norm.float() ** 2
    total = total_sq.sqrt()
    if max_norm is not None and grads:
        # Without `if coef < 1`: no host sync; multiplying by 1 is harmless.
        coef = clip_coefficient(total, max_norm)
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        torch._foreach_mul_(local, coef.to(local[0].dtype))
    return total
