"""`CompiledAdamW`: torch's AdamW update rule, stepped by one inductor-compiled
elementwise function called on each parameter, instead of torch's fused multi-tensor
kernel.

It is a `torch.optim.AdamW` (same param groups, the same `step` / `exp_avg` /
`exp_avg_sq` state, so checkpoints, schedulers and `state_dict` are unchanged); only
`step()` differs. The update computes in float32 whatever the parameters' dtype and
writes each parameter and its two moments back in place, one kernel per tensor, which
inductor generates closer to the card's bandwidth than the multi-tensor kernel reads
it. The function is compiled once, with a dynamic length (each tensor is passed as a
1-D view): a graph over every parameter at once would take a minute and a half to
compile for a 1B model.

`grad_scale` is honoured as torch's fused AdamW honours it (each gradient is divided
by it inside the step), which is how `ft.training.step.optimizer_step` folds the
clipping factor into the update without a pass that rewrites the gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _local(tensor: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def adamw_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, lr: Tensor,
                  inv_grad_scale: Tensor, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step of one tensor (decoupled weight decay, bias-corrected moments) in
    place, computed in float32.

    `lr` and `inv_grad_scale` are 0-d float32 tensors on the parameter's device, so a
    new learning rate or clipping factor does not recompile.
    """
    g = grad.float() * inv_grad_scale
    new_step = step + 1
    m = exp_avg.float() * beta1 + g * (1 - beta1)
    v = exp_avg_sq.float() * beta2 + g * g * (1 - beta2)
    bias_correction1 = 1 - torch.pow(beta1, new_step)
    bias_correction2 = 1 - torch.pow(beta2, new_step)
    p = param.float() * (1 - lr * weight_decay)
    denom = v.sqrt() / bias_correction2.sqrt() + eps
    p = p - (lr / bias_correction1) * m / denom
    param.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    step.copy_(new_step)


def _flat(tensor: Tensor) -> Tensor:
    """A 1-D view where there is one, so tensors of every shape share one compiled kernel."""
    return tensor.view(-1) if tensor.is_contiguous() else tensor


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
        self._scalars: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _update_fn(self, device: torch.device):
        if self._update is None:
            compile = device.type == "cuda" if self._compile is None else self._compile
            self._update = torch.compile(adamw_update_, fullgraph=True, dynamic=True) if compile else adamw_update_
        return self._update

    def _device_scalars(self, device: torch.device, lr: float, grad_scale: Any) -> tuple[Tensor, Tensor]:
        if device not in self._scalars:
            self._scalars[device] = (torch.zeros((), dtype=torch.float32, device=device),
                                     torch.ones((), dtype=torch.float32, device=device))
        lr_t, inv_t = self._scalars[device]
        lr_t.fill_(lr)  # a host float: filled by a kernel argument, no copy or sync
        if grad_scale is None:
            inv_t.fill_(1.0)
        else:
            torch.reciprocal(grad_scale.to(device=device, dtype=torch.float32), out=inv_t)
        return lr_t, inv_t

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
            constants = {"beta1": beta1, "beta2": beta2, "eps": float(group["eps"]),
                         "weight_decay": float(group["weight_decay"])}
            scalars = None
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
                local = _local(param)
                if scalars is None:
                    scalars = self._device_scalars(local.device, group["lr"], grad_scale)
                    update = self._update_fn(local.device)
                update(_flat(local), _flat(_local(param.grad)), _flat(_local(state["exp_avg"])),
                       _flat(_local(state["exp_avg_sq"])), _local(state["step"]), *scalars, **constants)
        return loss
