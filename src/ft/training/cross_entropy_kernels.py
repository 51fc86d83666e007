"""The Triton kernel of `ft.training.cross_entropy_kernel` (imported only where Triton is).

`softmax_gradient_rows`: each program takes rows pid, pid + programs, ...; for a row it runs
an online max and sum of exp2 over the row's tiles (one lane per column of a tile, merged at
the end), stores log-sum-exp minus the label's logit, then reads the row again and writes
exp(logit - lse) - (column == label) over it.
"""

import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# A finite start for the lanes' running max: a tile's masked lanes load -inf, and
# exp2(-inf - start) is 0 where exp2(-inf - -inf) would be NaN.
_LOWEST = tl.constexpr(-1.0e38)


@triton.jit
def softmax_gradient_rows(Logits, Labels, Loss, n_rows, n_cols, stride_row, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offsets = tl.arange(0, BLOCK)
    for row in range(pid, n_rows, programs):
        base = Logits + tl.cast(row, tl.int64) * stride_row
        label = tl.load(Labels + row)
        max_lanes = tl.full([BLOCK], _LOWEST, dtype=tl.float32)
        sum_lanes = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offsets
            y = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32) * _LOG2E
            new_max = tl.maximum(max_lanes, y)
            sum_lanes = sum_lanes * tl.math.exp2(max_lanes - new_max) + tl.math.exp2(y - new_max)
            max_lanes = new_max
        row_max = tl.max(max_lanes, 0)
        lse2 = row_max + tl.math.log2(tl.sum(sum_lanes * tl.math.exp2(max_lanes - row_max), 0))
        label_logit = tl.load(base + label).to(tl.float32)
        tl.store(Loss + row, lse2 * _LN2 - label_logit)
        for start in range(0, n_cols, BLOCK):
            cols = start + offsets
            in_row = cols < n_cols
            y = tl.load(base + cols, mask=in_row, other=0.0).to(tl.float32) * _LOG2E
            grad = tl.math.exp2(y - lse2) - tl.where(cols == label, 1.0, 0.0)
            tl.store(base + cols, grad.to(Logits.dtype.element_ty), mask=in_row)
