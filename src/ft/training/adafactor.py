"""`Adafactor`: torch's Adafactor (same hyper-parameters, state and update rule),
stepped so that it fits beside an 8B model in 24 GB and does not stall the GPU.

torch's step reads the parameter's RMS and the update's RMS with `.item()` (two
device syncs per parameter: stepping in backward, each one waits for the backward
so far) and materialises full-size temporaries (the variance estimate, the update;
a float32 copy of a bf16 parameter for stochastic rounding): for the 128k x 4096
embedding of an 8B model that is several GiB at once. Here the scalars stay on the
device and a matrix is stepped in row blocks of at most `max_chunk_numel` elements,
in three passes: the statistics (whole-tensor reductions), the update's norm, and
the write, each block's update recomputed from the factored statistics and the
gradient rather than kept.

On a GPU the three passes over a matrix are compiled (`torch.compile`): each is a
fused kernel or two that read the gradient (and the parameter) once, instead of a
dozen elementwise kernels each reading and writing float32 temporaries, and the
step's scalars stay inside them. Eager, stepping an 8B model moved about 170 bytes
per parameter; compiled, about 10, in a handful of launches per parameter (stepping
in backward, the launches are what the backward waits for).

`stochastic_rounding=True` computes a bfloat16 parameter's step in float32 (states
in float32) and rounds each block back stochastically, with bits hashed from (seed,
parameter, step, element) (`ft.training.stochastic_rounding.hashed_round_to_bf16`),
so a resumed run rounds as the uninterrupted one and the compiled write fuses the
rounding.

Sharded (DTensor) parameters are stepped whole and eagerly, with the same tensor
operations torch's Adafactor uses on them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ft.training.stochastic_rounding import hashed_round_to_bf16, rounding_key

DEFAULT_MAX_CHUNK_NUMEL = 1 << 24  # 64 MiB of float32 per temporary


def _is_dtensor(tensor: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def factored_update(grad: Tensor, row_var: Tensor, col_var: Tensor, row_var_mean: Tensor, eps1_sq: float,
                    work: torch.dtype) -> Tensor:
    """Adafactor's update of a block of rows: the gradient over the root of the rank-1
    estimate of its second moment (row statistics x column statistics / their mean)."""
    estimate = row_var * col_var / row_var_mean
    return grad.to(work) * estimate.clamp(min=eps1_sq).rsqrt()


def factored_update_sq(grad: Tensor, row_var: Tensor, col_var: Tensor, row_var_mean: Tensor, eps1_sq: float,
                       work: torch.dtype) -> Tensor:
    """The squared norm (float32) of a block's update: pass 2."""
    update = factored_update(grad, row_var, col_var, row_var_mean, eps1_sq, work)
    # Rows first, then their total: compiled with dynamic shapes, one reduction over the
    # whole block ran in a single thread block, at a tenth of the memory bandwidth.
    return torch.linalg.vector_norm(update, dim=-1, dtype=torch.float32).square().sum()


def factored_statistics(param: Tensor, grad: Tensor, row_var: Tensor, col_var: Tensor,
                        one_minus_beta2: float | Tensor, eps1: float) -> tuple[Tensor, Tensor]:
    """Pass 1 for a matrix: the parameter's squared norm (float32), the row and column
    statistics of the gradient's second moment moved towards this step's (in place), and
    the rows' mean (the estimate's normaliser). The norms read the tensors in place,
    accumulating in float32 (eagerly, `.float()` would copy a whole shard first)."""
    param_sq = torch.linalg.vector_norm(param, dtype=torch.float32).square()
    for var, dim in ((row_var, -1), (col_var, -2)):
        # out of place: on a sharded gradient the column norm is a partial sum
        mean = torch.linalg.vector_norm(grad, dim=dim, keepdim=True, dtype=torch.float32).square() / grad.size(dim)
        var.lerp_(mean.to(var.dtype), one_minus_beta2)
    return param_sq, row_var.mean(dim=-2, keepdim=True).clamp(min=eps1)


def update_scale(param_sq: Tensor, update_sq: Tensor, numel: int, rho: float | Tensor, eps2: float, d: float,
                 work: torch.dtype) -> Tensor:
    """-(relative step size) / max(1, RMS(update) / d): torch's Adafactor's scale of the update."""
    alpha = torch.clamp((param_sq / numel).sqrt(), min=eps2) * rho
    return (-alpha / torch.clamp((update_sq / numel).sqrt() / d, min=1.0)).to(work)


def apply_update(param: Tensor, update: Tensor, decay: float | Tensor, scale: Tensor, key: Tensor | None,
                 offset: int) -> None:
    """param <- param * decay + update * scale, in the update's dtype; rounded stochastically
    to the bf16 `param` when `key` is given (bits of elements `offset`... of the parameter)."""
    new = param.to(update.dtype) * decay + update * scale
    param.copy_(new if key is None else hashed_round_to_bf16(new, key, offset))


def apply_factored_update(param: Tensor, grad: Tensor, row_var: Tensor, col_var: Tensor, row_var_mean: Tensor,
                          eps1_sq: float, work: torch.dtype, decay: Tensor, param_sq: Tensor, update_sq: Tensor,
                          rho: Tensor, numel: int, eps2: float, d: float, key: Tensor | None, offset: int) -> None:
    """Pass 3 for a block of a matrix: recompute its update, scale it and write it."""
    update = factored_update(grad, row_var, col_var, row_var_mean, eps1_sq, work)
    scale = update_scale(param_sq, update_sq, numel, rho, eps2, d, work)
    apply_update(param, update, decay, scale, key, offset)


_compiled: dict[str, object] = {}


def _matrix_fns(device: torch.device):
    """The three passes over a matrix: compiled on GPUs (a fused kernel or two each, so
    a parameter costs a handful of launches), eager elsewhere."""
    if device.type != "cuda":
        return factored_statistics, factored_update_sq, apply_factored_update
    if not _compiled:
        # dynamic: matrices and blocks of many sizes (and offsets) share one graph instead of one each
        for name, fn in (("stats", factored_statistics), ("sq", factored_update_sq),
                         ("apply", apply_factored_update)):
            _compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _compiled["stats"], _compiled["sq"], _compiled["apply"]


# Compiled, a block's passes keep no block-sized temporaries: blocks only bound what an
# unfused kernel would allocate, so they can be larger (fewer launches).
COMPILED_MIN_CHUNK_NUMEL = 1 << 26


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
        device = _local(param).device
        key = torch.full((), rounding_key(seed=self.seed, index=index, step=int(step)), dtype=torch.int32,
                         device=device) if rounds else None
        if grad.dim() == 2 and not _is_dtensor(param):
            self._step_matrix(param, grad, state, work, eps1, eps2, group["d"], one_minus_beta2, rho, decay, key)
            return

        # Vectors, stacks of matrices and shards: whole, eagerly.
        if grad.dim() > 1:
            param_sq, row_var_mean = factored_statistics(param, grad, state["row_var"], state["col_var"],
                                                         one_minus_beta2, eps1)
            update = factored_update(grad, state["row_var"], state["col_var"], row_var_mean, eps1 * eps1, work)
        else:
            param_sq = torch.linalg.vector_norm(param, dtype=torch.float32).square()
            variance = state["variance"].lerp_(grad.to(work).square(), one_minus_beta2)
            update = grad.to(work) * variance.clamp(min=eps1 * eps1).rsqrt()
        update_sq = torch.linalg.vector_norm(update, dtype=torch.float32).square()
        scale = update_scale(param_sq, update_sq, param.numel(), rho, eps2, group["d"], work)
        new = param.to(work) * decay + update * scale
        if rounds:
            _local(param).copy_(hashed_round_to_bf16(_local(new), key))
        else:
            param.copy_(new)

    def _step_matrix(self, param: Tensor, grad: Tensor, state: dict, work: torch.dtype, eps1: float, eps2: float,
                     d: float, one_minus_beta2: float, rho: float, decay: float, key: Tensor | None) -> None:
        """Three passes over a plain matrix: its statistics, the update's norm and the write,
        the last two a block of rows at a time."""
        stats_fn, update_sq_fn, apply_fn = _matrix_fns(param.device)
        compiled = stats_fn is not factored_statistics
        if compiled:  # device scalars (fill kernels, no copies): as Python floats they would change every step
            one_minus_beta2, rho, decay = (torch.full((), value, dtype=torch.float32, device=param.device)
                                           for value in (one_minus_beta2, rho, decay))
        row_var, col_var = state["row_var"], state["col_var"]
        param_sq, row_var_mean = stats_fn(param, grad, row_var, col_var, one_minus_beta2, eps1)
        blocks = self._blocks(param, COMPILED_MIN_CHUNK_NUMEL if compiled else 0)
        update_sq = None
        for rows in blocks:
            update_sq = _add(update_sq, update_sq_fn(grad[rows], row_var[rows], col_var, row_var_mean,
                                                     eps1 * eps1, work))
        for rows in blocks:
            apply_fn(param[rows], grad[rows], row_var[rows], col_var, row_var_mean, eps1 * eps1, work, decay,
                     param_sq, update_sq, rho, param.numel(), eps2, d, key, rows.start * param.shape[-1])

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

    def _blocks(self, param: Tensor, min_chunk_numel: int = 0) -> list[slice]:
        """Row blocks of a plain matrix (one block when it is small)."""
        rows = max(1, max(self.max_chunk_numel, min_chunk_numel) // max(1, param.shape[-1]))
        return [slice(start, min(start + rows, param.shape[0])) for start in range(0, param.shape[0], rows)]


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _add(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total + value
