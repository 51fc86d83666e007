"""Cross-entropy summed over target tokens, without full-vocabulary fp32 logits.

Only positions with a label (not -100) go through the output projection (the
model's `lm_head` module, so tensor-parallel hooks gather each chunk's logits), in
chunks of `chunk_size` tokens, so at most chunk_size x vocab logits exist at
once. The sum (not the mean) is returned: the trainer divides by the target
tokens of the whole optimizer step, across accumulation steps and ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss(hidden_CD: torch.Tensor, output: nn.Module, labels_C: torch.Tensor) -> torch.Tensor:
    logits_CV = output(hidden_CD)
    return F.cross_entropy(logits_CV.float(), labels_C, reduction="sum")


def chunked_cross_entropy_sum(
    hidden_BTD: torch.Tensor,
    output: nn.Module,
    labels_BT: torch.Tensor,
    *,
    chunk_size: int = 1024,
    target_index_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum over target tokens of -log p(label), computed chunk by chunk in float32.

    `target_index_N`: the flat positions of the target tokens, computed on the host
    from the CPU labels (`target_positions`); it saves the device->host sync that
    selecting them with a boolean mask on the GPU costs.
    """
    if target_index_N is None:
        target_index_N = target_positions(labels_BT).to(labels_BT.device)
    num_targets = target_index_N.shape[0]
    hidden_ND = hidden_BTD.flatten(0, 1).index_select(0, target_index_N)
    labels_N = labels_BT.flatten().index_select(0, target_index_N)
    total = hidden_BTD.new_zeros((), dtype=torch.float32)
    for start in range(0, num_targets, chunk_size):
        # Recomputed in backward, so no chunk's logits outlive its own loss.
        total = total + checkpoint(
            _chunk_loss,
            hidden_ND[start : start + chunk_size],
            output,
            labels_N[start : start + chunk_size],
            use_reentrant=False,
        )
    if num_targets == 0:
        # Keep the graph connected so backward works on a batch without targets.
        total = total + 0.0 * hidden_BTD.sum()
    return total


def target_positions(labels_BT: torch.Tensor) -> torch.Tensor:
    """Flat indices of the positions that carry a label (call it on CPU labels)."""
    return torch.nonzero(labels_BT.flatten() != IGNORE_INDEX).squeeze(1)


def cross_entropy_sum(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """The same sum from full logits (reference path, and for sharded-vocabulary logits)."""
    return F.cross_entropy(
        logits_BTV.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
