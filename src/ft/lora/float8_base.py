"""LoRA's frozen base linears in float8: weights quantized once, matmuls on float8 tensor cores.

A frozen weight never changes, so it is cast to float8 (e4m3) once, after the base
checkpoint is loaded, and kept that way: half the bytes of bf16, and no per-step cast
of the weight. Its linear then runs two float8 matmuls through `torch._scaled_mm`:

    forward          y  = x W^T         x cast to e4m3 per call
    input gradient   dx = dy W          dy cast to e4m3 (rowwise) or e5m2 (tensorwise)

and no weight gradient at all: the base is frozen. torchao's `Float8Linear` is a
training layer, which casts its weight on every call and computes the weight's gradient
whether or not it is needed; here both would be wasted work, the second a third of
the base's matmuls. The scaling follows torchao's recipes of the same names:

- `tensorwise`: one scale per tensor (cuBLAS's float8 GEMM, the fastest);
- `rowwise`: one scale per row of x and dy and per output row of W (CUTLASS's rowwise
  GEMM). For the input gradient the weight's row scales are folded into dy before it
  is cast, so the same float8 weight serves both matmuls.

Scales are amax-based (largest magnitude to the format's largest finite value),
computed in float32. Nothing here changes what is saved: the trainer state holds the
adapters, and merges read the base checkpoint's own weights, never these float8 ones.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
SCALINGS = ("tensorwise", "rowwise")
AMAX_FLOOR = 1e-12  # an all-zero tensor keeps a finite scale


def quantize(t: Tensor, dtype: torch.dtype, *, rowwise: bool) -> tuple[Tensor, Tensor]:
    """`t` (2-D) cast to the float8 `dtype` and the float32 scale that undoes it
    (t ~= q * scale): one per row ([rows, 1]) or one for the tensor (a 0-d tensor)."""
    t = t.float()
    amax = t.abs().amax(dim=-1, keepdim=True) if rowwise else t.abs().amax()
    scale = amax.clamp(min=AMAX_FLOOR) / torch.finfo(dtype).max
    q = (t / scale).clamp(torch.finfo(dtype).min, torch.finfo(dtype).max).to(dtype)
    return q.contiguous(), scale  # torch._scaled_mm's first operand must be row-major


class _Float8FrozenMatmul(torch.autograd.Function):
    """y = x W^T with W frozen in float8; the backward returns x's gradient only."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, weight_scale: Tensor, rowwise: bool,
                out_dtype: torch.dtype) -> Tensor:
        x_q, x_scale = quantize(x, E4M3, rowwise=rowwise)
        # weight_scale: [1, out] rowwise (a column scale of W^T), 0-d tensorwise.
        y = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale, scale_b=weight_scale, out_dtype=out_dtype)
        ctx.save_for_backward(weight, weight_scale)
        ctx.rowwise, ctx.x_dtype = rowwise, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        weight, weight_scale = ctx.saved_tensors
        # dx = dy W: the second operand must be column-major, so W's float8 bytes are transposed
        # (one pass over the weight; cheaper than keeping a second copy resident).
        weight_cm = weight.t().contiguous().t()
        if ctx.rowwise:
            # dy diag(s_w) W_q: fold the weight's row scales into dy, then scale per row of dy.
            g_q, g_scale = quantize(grad_y.float() * weight_scale, E4M3, rowwise=True)
            ones = torch.ones(1, weight.shape[1], device=weight.device, dtype=torch.float32)
            grad_x = torch._scaled_mm(g_q, weight_cm, scale_a=g_scale, scale_b=ones, out_dtype=grad_y.dtype)
        else:
            g_q, g_scale = quantize(grad_y, E5M2, rowwise=False)
            grad_x = torch._scaled_mm(g_q, weight_cm, scale_a=g_scale, scale_b=weight_scale,
                                      out_dtype=grad_y.dtype)
        return grad_x.to(ctx.x_dtype), None, None, None, None


def float8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, *, rowwise: bool,
                  out_dtype: torch.dtype) -> Tensor:
    """F.linear for a frozen float8 `weight` ([out, in]) with its scale from `quantize_weight`."""
    shape = x.shape
    y = _Float8FrozenMatmul.apply(x.reshape(-1, shape[-1]), weight, weight_scale, rowwise, out_dtype)
    y = y.reshape(*shape[:-1], y.shape[-1])
    return y if bias is None else y + bias


@torch.no_grad()
def quantize_weight(weight: Tensor, *, rowwise: bool) -> tuple[Tensor, Tensor]:
    """A frozen weight [out, in] in e4m3 and its scale in the layout `float8_linear` takes:
    [1, out] rowwise, 0-d tensorwise."""
    q, scale = quantize(weight, E4M3, rowwise=rowwise)
    return q, (scale.reshape(1, -1).contiguous() if rowwise else scale)


def is_float8(tensor: Tensor) -> bool:
    return tensor.dtype in (E4M3, E5M2)


def float8_matmul_available(device: torch.device | str, scaling: str, out_dtype: torch.dtype) -> str | None:
    """None when torch can run this scaling's float8 matmul on `device` with `out_dtype` results,
    else why not (probed with a tiny `torch._scaled_mm`: CPUs run it in recent torch, slowly, for
    tests; CUDA's rowwise kernel returns bfloat16 only)."""
    a = torch.ones(16, 16, device=device).to(E4M3)
    if scaling == "rowwise":
        scale_a, scale_b = torch.ones(16, 1, device=device), torch.ones(1, 16, device=device)
    else:
        scale_a, scale_b = torch.ones((), device=device), torch.ones((), device=device)
    try:
        torch._scaled_mm(a, a.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    except (RuntimeError, NotImplementedError) as error:
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return None


def alignable(module: nn.Linear) -> bool:
    """torch._scaled_mm needs both dimensions of the weight to be multiples of 16."""
    out_features, in_features = module.weight.shape
    return out_features % 16 == 0 and in_features % 16 == 0


__all__ = ["SCALINGS", "alignable", "float8_linear", "float8_matmul_available", "is_float8", "quantize",
           "quantize_weight"]
