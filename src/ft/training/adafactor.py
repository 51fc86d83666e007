"""`Adafactor`: torch's Adafactor (same hyper-parameters, state and update rule),
stepped so that it fits beside an 8B model in 24 GB and does not stall the GPU.

torch's step reads the parameter's RMS and the update's RMS with `.item()` (two
device syncs per parameter: stepping in backward, each one waits for the backward
so far) and materialises full-size temporaries (the variance estimate, the update;
a float32 copy of a bf16 parameter for stochastic rounding): for the 128k x 4096
embedding of an 8B model that is several GiB at once. Here the scalars stay on the
device and a matrix is stepped in row blocks of at most `max_chunk_numel` elements,
in three passes (statistics, by whole-tensor reductions; the update's norm; the
write), each block's update recomputed rather than kept (kept when there is one).

`stochastic_rounding=True` computes a bfloat16 parameter's step in float32 (states
in float32) and rounds each block back stochastically
(`ft.training.stochastic_rounding`; the bits are seeded by (seed, parameter,
step), so a resumed run rounds as the uninterrupted one).

Sharded (DTensor) parameters are stepped whole, with the same tensor operations
torch's Adafactor uses on them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ft.training.stochastic_rounding import rounding_generator, stochastic_round_to_bf16

DEFAULT_MAX_CHUNK_NUMEL = 1 << 24  # 64 MiB of float32 per temporary


def _is_dtensor(tensor: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


class Adafactor(torch.optim.Adafactor):
    def __init__(self, params, *, stochastic_rounding: bool = False, seed: int = 0,
                 max_chunk_numel: int = DEFAULT_MAX_CHUNK_NUMEL, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.stochastic_rounding = stochastic_rounding
        self.seed = seed
        self.max_chunk_numel = max_chunk_numel

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    if param.grad.is_sparse or torch.is_complex(param):
                        raise RuntimeError("Adafactor does not support sparse gradients or complex parameters")
                    self._step_param(param, group, index)
                index += 1
        return loss

    def _step_param(self, param: Tensor, group: dict, index: int) -> None:
        grad = -param.grad if group["maximize"] else param.grad
        rounds = self.stochastic_rounding and param.dtype == torch.bfloat16
        work = torch.float32 if rounds else param.dtype
        state = self._state_for(param, grad, work)
        state["step"] += 1
        step = state["step"].item()  # a host tensor: no device sync
        lr = float(group["lr"])
        eps1, eps2 = group["eps"]
        eps1 = torch.finfo(work).eps if eps1 is None else eps1
        one_minus_beta2 = step ** group["beta2_decay"]
        rho = min(lr, 1 / math.sqrt(step))
        decay = 1 - lr * group["weight_decay"]
        blocks = self._blocks(param)

        # Pass 1: the parameter's norm and the gradient's second-moment statistics (reductions
        # read the tensors in place, accumulating in float32: no copies, no blocks needed).
        param_sq = torch.linalg.vector_norm(param, dtype=torch.float32).square()
        if grad.dim() > 1:
            row_var, col_var = state["row_var"], state["col_var"]
            for var, dim in ((row_var, -1), (col_var, -2)):
                # out of place: on a sharded gradient the column norm is a partial sum
                mean = torch.linalg.vector_norm(grad, dim=dim, keepdim=True, dtype=torch.float32).square()
                var.lerp_(mean.div(grad.size(dim)).to(work), one_minus_beta2)
            row_var_mean = row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1)
        else:
            state["variance"].lerp_(grad.to(work).square(), one_minus_beta2)

        def update(rows) -> Tensor:
            if grad.dim() > 1:
                estimate = (_rows(row_var, rows) @ col_var).div_(row_var_mean)
            else:
                estimate = state["variance"].clone()
            return estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(_rows(grad, rows).to(work))

        # Pass 2: the update's RMS (torch clips it to d); pass 3: the write.
        numel = param.numel()
        update_sq, kept = None, None
        for rows in blocks:
            values = update(rows)
            update_sq = _add(update_sq, torch.linalg.vector_norm(values, dtype=torch.float32).square())
            kept = values if len(blocks) == 1 else None  # one block: pass 3 reuses it
        alpha = torch.clamp((param_sq / numel).sqrt(), min=eps2) * rho
        scale = -alpha / torch.clamp((update_sq / numel).sqrt() / group["d"], min=1.0)
        generator = rounding_generator(_local(param).device, seed=self.seed, index=index, step=int(step)) \
            if rounds else None
        for rows in blocks:
            target = _rows(param, rows)
            new = target.to(work)  # a copy only when rounding
            if decay != 1:
                new = new.mul_(decay) if rounds else target.mul_(decay)
            step_values = (kept if kept is not None else update(rows)).mul_(scale.to(work))
            if rounds:
                new = new.add_(step_values)
                _local(target).copy_(stochastic_round_to_bf16(_local(new), generator=generator))
            else:
                target.add_(step_values)

    def _state_for(self, param: Tensor, grad: Tensor, work: torch.dtype) -> dict:
        state = self.state[param]
        if not state:  # torch's layout (resumes either way), in the working dtype
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if grad.dim() > 1:
                row_shape, col_shape = list(grad.shape), list(grad.shape)
                row_shape[-1], col_shape[-2] = 1, 1
                state["row_var"] = grad.new_zeros(row_shape, dtype=work)
                state["col_var"] = grad.new_zeros(col_shape, dtype=work)
            else:
                state["variance"] = torch.zeros_like(grad, dtype=work, memory_format=torch.preserve_format)
        return state

    def _blocks(self, param: Tensor) -> list[slice | None]:
        """Row blocks of a plain matrix; None (the whole tensor) for anything else."""
        if param.dim() != 2 or _is_dtensor(param):
            return [None]
        rows = max(1, self.max_chunk_numel // max(1, param.shape[1]))
        return [slice(start, start + rows) for start in range(0, param.shape[0], rows)]


def _rows(tensor: Tensor, rows: slice | None) -> Tensor:
    return tensor if rows is None else tensor[rows]


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _add(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total + value
