"""`LoraLinear`: a frozen linear plus a trainable low-rank update, PEFT's layout.

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A: [r, in], B: [out, r]

It is an `nn.Linear` (the base weight stays `<name>.weight`, so checkpoints load and
HF exports save under the base's names) with children `lora_A` and `lora_B`, so the
adapter keys are PEFT's without renaming: `<name>.lora_A.weight`, `<name>.lora_B.weight`.

Tensor parallelism: `parallel_style(style)` turns the base's style into one that
shards the adapters to match. Column-wise (W sharded on out): A replicated, B
sharded on out, so both paths give the same Shard(-1) output. Row-wise (W sharded on
in): A sharded on in, B replicated; both paths give a Partial output, summed by the
one all-reduce the base already does.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from ft.lora import float8_base, quant
from ft.lora.quant import linear as base_linear


class LoraLinear(nn.Linear):
    adapter_children = ("lora_A", "lora_B")  # not in a base checkpoint (see ft.models.checkpoint)
    # Set by `float8_frozen_linears`: the base weight is float8 and `weight_scale` undoes it.
    float8_scaling: str | None = None
    float8_out_dtype: torch.dtype | None = None

    def __init__(self, in_features: int, out_features: int, *, bias: bool, rank: int, alpha: float,
                 dropout: float = 0.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)

    @classmethod
    def wrap(cls, base: nn.Linear, *, rank: int, alpha: float, dropout: float, dtype: torch.dtype) -> "LoraLinear":
        """A LoraLinear that takes over `base`'s weight (and bias) Parameters; adapters in `dtype`."""
        module = cls(base.in_features, base.out_features, bias=base.bias is not None, rank=rank, alpha=alpha,
                     dropout=dropout, device=base.weight.device, dtype=dtype)
        module.weight = base.weight
        module.bias = base.bias
        return module

    def forward(self, x: Tensor) -> Tensor:
        if self.float8_scaling is not None:
            y = float8_base.float8_linear(x, self.weight, self.weight_scale, self.bias,
                                          rowwise=self.float8_scaling == "rowwise", out_dtype=self.float8_out_dtype)
        else:
            y = base_linear(x, self.weight, self.bias)
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """(alpha / r) B A: what merging adds to the base weight (plain tensors only)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def parallel_style(self, style):
        """The tensor-parallel style for this module, given the one its base linear would get."""
        kinds = {ColwiseParallel: LoraColwiseParallel, RowwiseParallel: LoraRowwiseParallel}
        if type(style) not in kinds:
            raise NotImplementedError(f"LoRA has no tensor-parallel layout for {type(style).__name__}")
        adapted = copy.copy(style)
        adapted.__class__ = kinds[type(style)]
        return adapted

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}, scaling={self.scaling:g}"


def _distribute(module: nn.Module, name: str, device_mesh, placements) -> None:
    from torch.distributed.tensor import distribute_tensor

    param = getattr(module, name)
    module.register_parameter(
        name, nn.Parameter(distribute_tensor(param, device_mesh, placements), requires_grad=param.requires_grad)
    )


class LoraColwiseParallel(ColwiseParallel):
    """ColwiseParallel for a LoraLinear: W and B sharded on the output dim, A replicated."""

    def _partition_linear_fn(self, name, module, device_mesh):
        from torch.distributed.tensor import Shard

        if name == "":
            for param_name, _ in list(module.named_parameters(recurse=False)):
                _distribute(module, param_name, device_mesh, [Shard(0)])
        elif name == "lora_B":
            _distribute(module, "weight", device_mesh, [Shard(0)])
        # lora_A (and anything else) is replicated by distribute_module.


class LoraRowwiseParallel(RowwiseParallel):
    """RowwiseParallel for a LoraLinear: W and A sharded on the input dim, B replicated."""

    def _partition_linear_fn(self, name, module, device_mesh):
        from torch.distributed.tensor import Shard

        if name == "":
            super()._partition_linear_fn(name, module, device_mesh)
        elif name == "lora_A":
            _distribute(module, "weight", device_mesh, [Shard(1)])


@torch.no_grad()
def quantize_frozen_linears(model: nn.Module, *, dtype: torch.dtype) -> int:
    """Replace the frozen weights of every adapted linear with NF4 (quantized from `dtype`).

    Call after the weights are loaded and before the first forward: FSDP2 adopts the
    new sharded parameters when it initializes lazily there. A collective under FSDP2.
    Returns the number of weights quantized.
    """
    count = 0
    for name, module in model.named_modules():
        weight = module.weight if isinstance(module, LoraLinear) else None
        if weight is None or weight.requires_grad or quant.is_nf4(getattr(weight, "_local_tensor", weight)):
            continue
        module.weight = nn.Parameter(quant.quantize(weight.detach(), dtype=dtype, name=f"{name}.weight"),
                                     requires_grad=False)
        count += 1
    return count


@torch.no_grad()
def float8_frozen_linears(model: nn.Module, scaling: str, *, dtype: torch.dtype) -> tuple[int, list[str]]:
    """Cast the frozen base weight of every adapted linear to float8 once (`scaling`:
    tensorwise or rowwise, see `ft.lora.float8_base`); they then compute in float8 and
    return `dtype`. Call after the weights are loaded, before compile traces a forward.
    Returns how many were cast and the names of those kept in `dtype` (a dimension not a
    multiple of 16, which the float8 matmul needs)."""
    count, kept = 0, []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLinear) or module.weight.requires_grad or module.float8_scaling is not None:
            continue
        if not float8_base.alignable(module):
            kept.append(name)
            continue
        weight, scale = float8_base.quantize_weight(module.weight.detach(), rowwise=scaling == "rowwise")
        module.weight = nn.Parameter(weight, requires_grad=False)
        module.register_buffer("weight_scale", scale, persistent=False)
        module.float8_scaling, module.float8_out_dtype = scaling, dtype
        count += 1
    return count, kept


__all__ = ["LoraColwiseParallel", "LoraLinear", "LoraRowwiseParallel", "float8_frozen_linears",
           "quantize_frozen_linears"]
