"""One pass over a loss chunk's logits: each row's cross-entropy, and d loss / d logits
written over the logits in place (`softmax_gradient_`).

The compiled expression of the same math (`ft.training.loss._chunk_loss_and_grads`) is one
inductor reduction that reads each row twice from memory and writes it once. Here each
program keeps one row in flight at a time, and a grid of about one program per SM keeps
all rows in flight (a row of a 128k vocabulary is 250 KB of bf16) inside the L2 cache, so
the second read of a row, for its gradient, mostly hits the cache.

Called only where `ft.triton_support.triton_usable` holds (CUDA, or the CPU interpreter).
"""

from __future__ import annotations

import functools

import torch


BLOCK = 8192
"""Logits per inner-loop tile of a program."""

NUM_WARPS = 16
PROGRAMS_PER_SM = 1


def softmax_gradient_(
    logits_CV: torch.Tensor,
    labels_C: torch.Tensor,
    *,
    block: int = BLOCK,
    num_warps: int = NUM_WARPS,
    programs_per_sm: int = PROGRAMS_PER_SM,
) -> torch.Tensor:
    """Per-row cross-entropy [C] in float32 (log-sum-exp minus the label's logit), with
    softmax(logits) - one_hot(label) written over `logits_CV` (rows contiguous) in its dtype.

    Every label must be a column index: the trainer drops ignored positions before the chunk."""
    if logits_CV.dim() != 2 or logits_CV.stride(1) != 1:
        raise ValueError(f"logits must be [rows, vocab] with contiguous rows, got {tuple(logits_CV.shape)} "
                         f"with strides {logits_CV.stride()}")
    rows, vocab = logits_CV.shape
    loss_C = torch.empty(rows, dtype=torch.float32, device=logits_CV.device)
    if rows == 0:
        return loss_C
    from ft.training.cross_entropy_kernels import softmax_gradient_rows

    programs = min(rows, _sm_count(logits_CV.device) * programs_per_sm)
    softmax_gradient_rows[(programs,)](
        logits_CV, labels_C, loss_C, rows, vocab, logits_CV.stride(0), BLOCK=block, num_warps=num_warps,
    )
    return loss_C


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # the interpreter: any grid runs, a small one keeps it short
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
