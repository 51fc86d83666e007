"""`CompiledAdamW`: torch's AdamW update rule, stepped by one inductor-compiled
elementwise function called on each parameter, instead of torch's fused multi-tensor
kernel.

It is a `torch.optim.AdamW` (same param groups, the same `step` / `exp_avg` /
`exp_avg_sq` state, so checkpoints, schedulers and `state_dict` are unchanged); only
`step()` differs. The update computes in float32 whatever the parameters' dtype and
writes each parameter and its two moments back in place, one kernel per tensor, which
inductor generates closer to the card's bandwidth than the multi-tensor kernel reads
it. The function is compiled for a dynamic number of rows (each tensor is passed as a
[rows, 1024] view where its length allows): a graph over every parameter at once
would take a minute and a half to compile for a 1B model. The bias corrections are
computed for all tensors first, in a few multi-tensor kernels.

`grad_scale` is honoured as torch's fused AdamW honours it (each gradient is divided
by it inside the step), which is how `ft.training.step.optimizer_step` folds the
clipping factor into the update without a pass that rewrites the gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def _local(tensor: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def adamw_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_size: Tensor,
                  bias_correction2_sqrt: Tensor, decay: Tensor, inv_grad_scale: Tensor, beta1: float, beta2: float,
                  eps: float) -> None:
    """One AdamW step of one tensor (decoupled weight decay, bias-corrected moments) in
    place, computed in float32.

    The 0-d float32 tensors (`step_size` = lr / (1 - beta1^t), `bias_correction2_sqrt` =
    sqrt(1 - beta2^t), `decay` = 1 - lr * weight_decay, `inv_grad_scale`) live on the
    parameter's device, so a new learning rate, weight decay, step or clipping factor
    does not recompile. The powers are computed before (`bias_corrections`): inside this
    function inductor would compute them again for every element.
    """
    g = grad.float() * inv_grad_scale
    m = exp_avg.float() * beta1 + g * (1 - beta1)
    v = exp_avg_sq.float() * beta2 + g * g * (1 - beta2)
    p = param.float() * decay
    denom = v.sqrt() / bias_correction2_sqrt + eps
    p = p - step_size * m / denom
    param.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def bias_corrections(steps: list[Tensor], lr: Tensor, beta1: float,
                     beta2: float) -> tuple[list[Tensor], list[Tensor]]:
    """Advance every step counter by one and return, for each, lr / (1 - beta1^t) and
    sqrt(1 - beta2^t): a handful of multi-tensor kernels for all of a group's parameters."""
    torch._foreach_add_(steps, 1)
    step_sizes = torch._foreach_pow(beta1, steps)
    torch._foreach_neg_(step_sizes)
    torch._foreach_add_(step_sizes, 1)
    torch._foreach_reciprocal_(step_sizes)
    torch._foreach_mul_(step_sizes, lr)
    corrections2_sqrt = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(corrections2_sqrt)
    torch._foreach_add_(corrections2_sqrt, 1)
    torch._foreach_sqrt_(corrections2_sqrt)
    return step_sizes, corrections2_sqrt


ROW = 1024


def _rows(tensor: Tensor) -> Tensor:
    """A [rows, ROW] view where the length allows, else a 1-D one: tensors of every shape
    share one kernel with a dynamic row count, and the static ROW tells inductor the
    length is a multiple of 16, which a dynamic 1-D length does not (vectorized loads)."""
    if not tensor.is_contiguous():
        return tensor
    # One row would be a graph of its own (dynamo specializes a length of 1).
    view = tensor.view(-1, ROW) if tensor.numel() % ROW == 0 and tensor.numel() > ROW else tensor.view(-1)
    torch._dynamo.maybe_mark_dynamic(view, 0)  # one graph for every length, not a first static one
    return view


class CompiledAdamW(torch.optim.AdamW):
    """AdamW whose step is one compiled elementwise function per tensor (see the module doc).

    `compile=None`: compiled where the parameters live on a GPU, eager elsewhere (the
    same function: inductor on a CPU costs minutes of C++ compilation for no speed).
    """

    def __init__(self, params: Any, *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, compile: bool | None = None) -> None:
        # capturable: torch keeps a loaded `step` on the parameter's device, where the update reads it.
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False,
                         capturable=True)
        self._compile = compile
        self._update = None
        self._scalars: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def _update_fn(self, device: torch.device):
        if self._update is None:
            compile = device.type == "cuda" if self._compile is None else self._compile
            # Not dynamic=True: `_rows` marks only the row count dynamic, so ROW stays static.
            self._update = torch.compile(adamw_update_, fullgraph=True) if compile else adamw_update_
        return self._update

    def _device_scalars(self, device: torch.device, lr: float, weight_decay: float,
                        grad_scale: Any) -> tuple[Tensor, Tensor, Tensor]:
        """lr, 1 - lr * weight_decay and 1 / grad_scale as 0-d tensors on `device` (reused:
        a group's kernels are queued before the next group refills them)."""
        if device not in self._scalars:
            self._scalars[device] = tuple(torch.ones((), dtype=torch.float32, device=device) for _ in range(3))
        lr_t, decay_t, inv_t = self._scalars[device]
        lr_t.fill_(lr)  # host floats: filled by a kernel argument, no copy or sync
        decay_t.fill_(1 - lr * weight_decay)
        if grad_scale is None:
            inv_t.fill_(1.0)
        else:
            torch.reciprocal(grad_scale.to(device=device, dtype=torch.float32), out=inv_t)
        return lr_t, decay_t, inv_t

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"]:
                raise ValueError("CompiledAdamW supports neither amsgrad nor maximize")
            if isinstance(group["lr"], Tensor) or any(isinstance(b, Tensor) for b in group["betas"]):
                raise ValueError("CompiledAdamW takes float learning rates and betas")
            beta1, beta2 = (float(b) for b in group["betas"])
            constants = {"beta1": beta1, "beta2": beta2, "eps": float(group["eps"])}
            by_device: dict[torch.device, list[nn.Parameter]] = {}
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise ValueError("CompiledAdamW does not support sparse gradients")
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                elif state["step"].device != param.device or state["step"].dtype != torch.float32:
                    state["step"] = state["step"].to(device=param.device, dtype=torch.float32)
                by_device.setdefault(_local(param).device, []).append(param)
            for device, params in by_device.items():
                lr_t, decay_t, inv_t = self._device_scalars(device, group["lr"], float(group["weight_decay"]),
                                                            grad_scale)
                update = self._update_fn(device)
                step_sizes, corrections2_sqrt = bias_corrections(
                    [_local(self.state[p]["step"]) for p in params], lr_t, beta1, beta2)
                for param, step_size, correction2_sqrt in zip(params, step_sizes, corrections2_sqrt):
                    state = self.state[param]
                    update(_rows(_local(param)), _rows(_local(param.grad)), _rows(_local(state["exp_avg"])),
                           _rows(_local(state["exp_avg_sq"])), step_size, correction2_sqrt, decay_t, inv_t,
                           **constants)
        return loss
