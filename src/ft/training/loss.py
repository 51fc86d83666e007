"""Cross-entropy summed over target tokens, without full-vocabulary fp32 logits.

Only positions with a label (not -100) go through the output projection, in
chunks of `chunk_size` tokens, so at most chunk_size x vocab logits exist at once.
The sum (not the mean) is returned: the trainer divides by the target tokens of
the whole optimizer step, across accumulation steps and ranks.

Two paths:
- a plain `nn.Linear` head (one device, FSDP, DDP): a fused linear + cross-entropy
  that computes each chunk's gradients for the hidden states and the weight in the
  forward pass, so backward recomputes nothing and no chunk's logits are kept;
- anything else (a tensor-parallel head, whose weight is a DTensor): each chunk goes
  through the head module (its hooks gather the logits), recomputed in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ft.models import tied_embedding
from ft.training import cross_entropy_kernel
from ft.triton_support import triton_usable

IGNORE_INDEX = -100


def chunked_cross_entropy_sum(
    hidden_BTD: torch.Tensor,
    output: nn.Module,
    labels_BT: torch.Tensor,
    *,
    chunk_size: int = 1024,
    target_index_N: torch.Tensor | None = None,
    backward_twice: bool = False,
) -> torch.Tensor:
    """sum over target tokens of -log p(label), computed chunk by chunk in float32.

    `target_index_N`: the flat positions of the target tokens, computed on the host
    from the CPU labels (`target_positions`); it saves the device->host sync that
    selecting them with a boolean mask on the GPU costs. `backward_twice`: backward
    runs over the loss twice (a zero-bubble pipeline schedule's input and weight
    passes), so the fused path must not scale its saved gradients in place.
    """
    if target_index_N is None:
        target_index_N = target_positions(labels_BT).to(labels_BT.device)
    num_targets = target_index_N.shape[0]
    if num_targets == 0:
        # Keep the graph connected so backward works on a batch without targets.
        return 0.0 * hidden_BTD.sum(dtype=torch.float32)
    labels_N = labels_BT.flatten().index_select(0, target_index_N)
    if _is_plain_linear(output):
        return _LinearCrossEntropy.apply(hidden_BTD.flatten(0, 1), output.weight, labels_N, target_index_N,
                                         chunk_size, backward_twice)
    hidden_ND = hidden_BTD.flatten(0, 1).index_select(0, target_index_N)
    total = hidden_BTD.new_zeros((), dtype=torch.float32)
    for start in range(0, num_targets, chunk_size):
        total = total + checkpoint(
            _module_chunk_loss,
            hidden_ND[start : start + chunk_size],
            output,
            labels_N[start : start + chunk_size],
            use_reentrant=False,
        )
    return total


def target_positions(labels_BT: torch.Tensor) -> torch.Tensor:
    """Flat indices of the positions that carry a label (call it on CPU labels)."""
    return torch.nonzero(labels_BT.flatten() != IGNORE_INDEX).squeeze(1)


def cross_entropy_sum(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """The same sum from full logits (reference path, and for sharded-vocabulary logits)."""
    return F.cross_entropy(
        logits_BTV.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _is_plain_linear(module: nn.Module) -> bool:
    if not isinstance(module, nn.Linear) or module.bias is not None:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return True
    return not isinstance(module.weight, DTensor)


def _module_chunk_loss(hidden_CD: torch.Tensor, output: nn.Module, labels_C: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output(hidden_CD).float(), labels_C, reduction="sum")


def _chunk_loss_and_grads(
    hidden_CD: torch.Tensor, weight_VD: torch.Tensor, labels_C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss sum of one chunk, its gradient w.r.t. the chunk's hidden states, and the
    gradient w.r.t. its logits (the weight's gradient is accumulated from it outside,
    in place, so no vocab x dim temporary is made per chunk)."""
    logits_CV = hidden_CD @ weight_VD.t()
    lse_C = torch.logsumexp(logits_CV.float(), dim=-1)
    loss = (lse_C - logits_CV.gather(1, labels_C[:, None]).squeeze(1).float()).sum()
    # d loss / d logits = softmax - one_hot(label). Written as one elementwise expression of
    # the logits (no float32 copy of them, no scatter into one): compiled, the reduction and
    # this are one kernel that reads the logits and writes the gradient over them in place.
    is_label_CV = torch.arange(weight_VD.shape[0], device=labels_C.device)[None, :] == labels_C[:, None]
    grad_logits_CV = (torch.exp(logits_CV.float() - lse_C[:, None]) - is_label_CV.float()).to(hidden_CD.dtype)
    return loss, grad_logits_CV @ weight_VD, grad_logits_CV


def _kernel_chunk_loss_and_grads(
    hidden_CD: torch.Tensor, weight_VD: torch.Tensor, labels_C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_chunk_loss_and_grads` with the softmax gradient from ft's Triton kernel."""
    logits_CV = hidden_CD @ weight_VD.t()
    loss_C = cross_entropy_kernel.softmax_gradient_(logits_CV, labels_C)
    return loss_C.sum(), logits_CV @ weight_VD, logits_CV


CHUNK_KERNELS = ("compiled", "triton")
chunk_kernel = "compiled"
"""The chunk math on CUDA: "compiled" (`_chunk_loss_and_grads` through inductor, one reduction
that reads each row twice), or "triton" (`ft.training.cross_entropy_kernel`: the same pass with
each row's second read from the L2 cache; where Triton runs, its CPU interpreter included). The
kernel stays opt-in until a GPU measurement shows it faster; benchmarks set this per variant."""

_compiled_chunk = None


def _chunk_fn(device: torch.device):
    """The chunk math: ft's kernel when `chunk_kernel` asks for it and Triton runs, else
    compiled on GPUs (fuses the fp32 softmax passes), eager elsewhere."""
    global _compiled_chunk
    if chunk_kernel not in CHUNK_KERNELS:
        raise ValueError(f"chunk_kernel must be one of {CHUNK_KERNELS}, got {chunk_kernel!r}")
    if chunk_kernel == "triton" and triton_usable(device):
        return _kernel_chunk_loss_and_grads
    if device.type != "cuda":
        return _chunk_loss_and_grads
    if _compiled_chunk is None:
        # dynamic: the last chunk's length changes with every batch's target count;
        # static shapes would recompile on each new length.
        _compiled_chunk = torch.compile(_chunk_loss_and_grads, dynamic=True)
    return _compiled_chunk


class _LinearCrossEntropy(torch.autograd.Function):
    """sum CE(hidden @ weight.T, labels), gradients computed during forward."""

    @staticmethod
    def forward(ctx, hidden_MD: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor,
                target_index_N: torch.Tensor, chunk_size: int, backward_twice: bool = False):
        # hidden_MD: every position; target_index_N: the rows with a label. Selecting them here,
        # not through autograd, lets backward write the rows' gradients with a plain copy
        # (index_copy_: the indices are distinct) where index_select's backward is an index_add_.
        # Under autocast the matmuls run in its dtype; spell it out so the in-place
        # weight-gradient accumulation (not autocast) runs in it too.
        device_type = hidden_MD.device.type
        autocast = torch.is_autocast_enabled(device_type)
        compute_dtype = torch.get_autocast_dtype(device_type) if autocast else hidden_MD.dtype
        hidden_ND = hidden_MD.index_select(0, target_index_N).to(compute_dtype)
        weight = weight_VD.to(compute_dtype)
        # fp32 master weights get an fp32 gradient; bf16 weights keep bf16. A frozen head (LoRA)
        # gets none: vocab x dim of zeros kept until backward is a GiB on an 8B model.
        needs_weight_grad = ctx.needs_input_grad[1]
        grad_weight = None
        # In the compute dtype; autograd casts it back. Rows without a label keep a zero gradient.
        grad_hidden = hidden_ND.new_zeros(hidden_MD.shape) if ctx.needs_input_grad[0] else None
        loss = hidden_ND.new_zeros((), dtype=torch.float32)
        chunk = _chunk_fn(hidden_ND.device)
        for start in range(0, hidden_ND.shape[0], chunk_size):
            end = start + chunk_size
            hidden_CD = hidden_ND[start:end]
            loss_c, grad_hidden_c, grad_logits_CV = chunk(hidden_CD, weight, labels_N[start:end])
            loss += loss_c
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, target_index_N[start:end], grad_hidden_c)
            if not needs_weight_grad:
                continue
            if grad_weight is None:  # the first chunk writes it: no zeros to read back
                grad_weight = (grad_logits_CV.t() @ hidden_CD).to(weight_VD.dtype)
            elif grad_weight.dtype == grad_logits_CV.dtype:
                grad_weight.addmm_(grad_logits_CV.t(), hidden_CD)
            else:  # fp32 master weights, bf16 compute: accumulate in fp32
                grad_weight += (grad_logits_CV.t() @ hidden_CD).to(grad_weight.dtype)
        if grad_weight is not None and not backward_twice:  # a scaled copy would be returned instead
            tied_embedding.hand_over(weight_VD, grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.backward_twice = backward_twice
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if ctx.backward_twice:  # the saved gradients are read again: scale copies
            if grad_weight is not None:
                grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
            if grad_hidden is not None:
                grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
            return grad_hidden, grad_weight, None, None, None, None
        # In place: the gradients were made for this backward alone (the graph is not
        # retained), and a scaled copy of the head's gradient is another vocab x dim.
        # One multi-tensor kernel: `mul_` by a 0-d device tensor runs torch's unvectorized
        # broadcast kernel, 0.8 ms a step over a 128k-vocabulary head's gradient on an H100.
        # (Its fast path needs one dtype, the scalar's too: fp32 master weights are a second list.)
        scaled = [tensor for tensor in (grad_hidden, grad_weight) if tensor is not None]
        for dtype in {tensor.dtype for tensor in scaled}:
            torch._foreach_mul_([tensor for tensor in scaled if tensor.dtype == dtype], grad_loss.to(dtype))
        return grad_hidden, grad_weight, None, None, None, None
