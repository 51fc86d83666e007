"""Random initialisation whose values do not depend on the parallel layout.

A family's `init_weights(seed)` fills each weight in module order from the global
RNG: one process draws each full tensor from its device's generator. On a
parallelized model the weights are DTensor shards, and a random fill on a shard
draws only the shard's numbers, so FSDP on 2 processes would start from other
weights than one process.

`full_tensor_random_init()` is a torch-function mode under which every random fill
(`Tensor.normal_`, `nn.init.normal_`, ...) of a DTensor is drawn for the full tensor on the
shard's device, in the same order as one process draws it (every rank seeds the same
generator), and each rank keeps its slice. Plain tensors draw as they always do, so
one process is unchanged. The values still depend on the device type (CPU and CUDA
generators differ), not on the layout. Deterministic fills (zeros, ones) run on the
shard as they are. One full tensor exists at a time, never the whole model.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from ft.models.checkpoint import local_slices

_RANDOM_FILLS = {
    torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.bernoulli_, torch.Tensor.random_,
    torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.log_normal_, torch.Tensor.cauchy_,
}

# `nn.init.normal_(t)` on a tensor subclass reaches a mode as itself, not as `t.normal_`.
_INIT_FUNCTIONS = {
    torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.trunc_normal_, torch.nn.init.xavier_normal_,
    torch.nn.init.xavier_uniform_, torch.nn.init.kaiming_normal_, torch.nn.init.kaiming_uniform_,
    torch.nn.init.orthogonal_, torch.nn.init.sparse_,
}


def _is_dtensor(tensor: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


class full_tensor_random_init(TorchFunctionMode):
    """Random fills of DTensors drawn in full, then sliced (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RANDOM_FILLS or func in _INIT_FUNCTIONS:
            # nn.init passes its tensor by keyword (`tensor=`), Tensor methods as `self`.
            target = args[0] if args else kwargs.get("tensor")
            if _is_dtensor(target):
                local, slices = local_slices(target)
                with torch.no_grad():
                    full = torch.empty(tuple(target.shape), dtype=target.dtype, device=local.device)
                    if args:
                        func(full, *args[1:], **kwargs)
                    else:
                        func(**{**kwargs, "tensor": full})
                    local.copy_(full[slices] if slices is not None else full)
                return target
        return func(*args, **kwargs)


__all__ = ["full_tensor_random_init"]
