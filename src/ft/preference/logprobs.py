"""Per-sequence log-probabilities of the responses, without full-vocabulary logits.

`log pi(y | x)` of each sequence is the sum over its response tokens of
`log softmax(h_t W^T)[y_t]`. Only response positions go through the output
projection, in chunks of `chunk_size` tokens, so at most chunk_size x vocab
float32 logits exist at once, in forward and in backward:

- a plain `nn.Linear` head (one device, FSDP, DDP): `_LinearLogProbs` keeps each
  chunk's log-sum-exp, and backward recomputes the chunk's logits to form
  `g * (onehot - softmax)`, accumulating the weight's gradient in place (no vocab x
  dim temporary per chunk). Unlike the SFT loss the upstream gradient differs per
  token (it depends on the pair's loss), so gradients cannot be made in forward.
- anything else (a tensor-parallel head): each chunk through the head module,
  recomputed in backward (`torch.utils.checkpoint`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ft.training.loss import _is_plain_linear, target_positions


def batch_sequence_logprobs(model: nn.Module, batch, device: torch.device, *,
                            chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response log-probs, response tokens) per sequence of a `PreferenceBatch`,
    both float32 `[2 * num_pairs]` on `device` (sequence 2k chosen, 2k+1 rejected)."""
    # Index tensors come from the host labels: a nonzero() on the device would sync.
    target_index_N = target_positions(batch.labels_BT)
    sequence_N = batch.sequence_ids_BT.flatten().index_select(0, target_index_N)
    num_sequences = 2 * batch.num_pairs
    counts_S = torch.bincount(sequence_N, minlength=num_sequences).float()
    batch = batch.to(device, non_blocking=True)
    hidden_BTD = model(batch.tokens_BT, positions_BT=batch.positions_BT, document_ids_BT=batch.document_ids_BT,
                       return_hidden=True)
    logp_S = sequence_logprobs(hidden_BTD, model.lm_head, batch.labels_BT,
                               sequence_N.to(device, non_blocking=True), num_sequences, chunk_size=chunk_size,
                               target_index_N=target_index_N.to(device, non_blocking=True))
    return logp_S, counts_S.to(device, non_blocking=True)


def sequence_logprobs(hidden_BTD: torch.Tensor, output: nn.Module, labels_BT: torch.Tensor, sequence_N: torch.Tensor,
                      num_sequences: int, *, chunk_size: int, target_index_N: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over each sequence's target positions (float32 `[num_sequences]`)."""
    logp_S = hidden_BTD.new_zeros((num_sequences,), dtype=torch.float32)
    if target_index_N.shape[0] == 0:
        # Keep the graph connected so backward works on a batch without targets.
        return logp_S + 0.0 * hidden_BTD.sum(dtype=torch.float32)
    hidden_ND = hidden_BTD.flatten(0, 1).index_select(0, target_index_N)
    labels_N = labels_BT.flatten().index_select(0, target_index_N)
    if _is_plain_linear(output):
        logp_N = _LinearLogProbs.apply(hidden_ND, output.weight, labels_N, chunk_size)
    else:
        logp_N = torch.cat([
            checkpoint(_module_chunk_logprobs, hidden_ND[s:s + chunk_size], output, labels_N[s:s + chunk_size],
                       use_reentrant=False)
            for s in range(0, hidden_ND.shape[0], chunk_size)
        ])
    return logp_S.index_add(0, sequence_N, logp_N)


def _module_chunk_logprobs(hidden_CD: torch.Tensor, output: nn.Module, labels_C: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(output(hidden_CD).float(), labels_C, reduction="none")


class _LinearLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[labels] per row, float32, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor, chunk_size: int):
        # Under autocast the matmuls run in its dtype; spelled out, since backward runs outside autocast.
        device_type = hidden_ND.device.type
        compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                         else hidden_ND.dtype)
        hidden = hidden_ND.to(compute_dtype)
        weight = weight_VD.to(compute_dtype)
        logp_N = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse_N = torch.empty_like(logp_N)
        for s in range(0, hidden.shape[0], chunk_size):
            logits_CV = (hidden[s:s + chunk_size] @ weight.t()).float()
            lse_C = torch.logsumexp(logits_CV, dim=-1)
            lse_N[s:s + chunk_size] = lse_C
            logp_N[s:s + chunk_size] = logits_CV.gather(1, labels_N[s:s + chunk_size, None]).squeeze(1) - lse_C
        ctx.save_for_backward(hidden, weight, labels_N, lse_N)
        ctx.chunk_size = chunk_size
        ctx.weight_dtype = weight_VD.dtype
        return logp_N

    @staticmethod
    def backward(ctx, grad_logp_N: torch.Tensor):
        hidden, weight, labels_N, lse_N = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        grad_hidden = torch.empty_like(hidden)
        # float32 master weights get a float32 accumulator; low-precision weights keep theirs.
        grad_weight = torch.zeros(weight.shape, dtype=ctx.weight_dtype, device=weight.device)
        for s in range(0, hidden.shape[0], chunk_size):
            hidden_CD = hidden[s:s + chunk_size]
            g_C = grad_logp_N[s:s + chunk_size].float()
            logits_CV = (hidden_CD @ weight.t()).float()
            # d logp / d logits = onehot(label) - softmax
            grad_logits_CV = torch.exp(logits_CV - lse_N[s:s + chunk_size, None]).mul_(-g_C[:, None])
            grad_logits_CV.scatter_add_(1, labels_N[s:s + chunk_size, None], g_C[:, None])
            grad_logits_CV = grad_logits_CV.to(hidden.dtype)
            grad_hidden[s:s + chunk_size] = grad_logits_CV @ weight
            if grad_weight.dtype == grad_logits_CV.dtype:
                grad_weight.addmm_(grad_logits_CV.t(), hidden_CD)
            else:  # float32 master weights, low-precision compute: accumulate in float32
                grad_weight += (grad_logits_CV.t() @ hidden_CD).to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None
