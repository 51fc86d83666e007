"""A model of peak GPU memory per rank for fine-tuning, from the arch and the settings.

`predict_memory(MemoryPlan(...))` adds up, in bytes per rank:
- weights: trainable and frozen parameters in their storage dtype, sharded by
  FSDP (dp x tp) or TP, plus the unsharded compute-dtype copies FSDP gathers (two
  blocks in flight; every block with `reshard_after_forward=false`) or autocast
  keeps for backward (one process, mixed precision, no activation checkpointing);
  LoRA's input embedding table counts nothing with `lora_embeddings_on_host`;
- gradients: one per trainable parameter in its dtype (float32 reduce under FSDP
  mixed precision), or, with the optimizer in backward, the two largest at once;
- optimizer states: the optimizer's own count (`OptimizerKind.state_bytes`),
  float32 where the step is stochastically rounded, none on the GPU when offloaded;
- step transient: what the step allocates beside them (float32 copies of one
  parameter and its gradient when stepped one at a time; torchao's low-bit steps
  their own intermediates for the largest parameter, `OptimizerKind.step_bytes_per_element`);
- activations: per token and block, what a Llama-shaped block saves for backward
  (`_block_bytes_per_token`) under no, elementwise, selective or full checkpointing (only the
  first `activation_checkpointing_blocks` blocks checkpointed, the rest none); with
  activation offloading, two blocks' worth stay on the GPU, or under full
  checkpointing two block inputs (the one being recomputed and the next, prefetched);
- recompute: under checkpointing of every block, the one block whose activations
  backward rebuilds while the saved ones are still alive (with some blocks not
  checkpointed, backward has freed at least that much of theirs by then);
- loss chunk: the float32 logits of one `loss_chunk_size` chunk and their
  exponentials, alive at the end of forward;
- QLoRA's dequantization: the NF4 weight of the linear being computed, dequantized
  (with float32 intermediates), inside a block in forward and backward.
Peak = weights + states + max(activations + loss chunk + output-layer gradient,
activations + recompute + output-layer gradient, gradients + step transient):
the end of forward, the first block's backward, the end of backward. `allocator_slack` (fragmentation, about 5%, and
the CUDA context, which `max_memory_allocated` does not count) is added for the
"does it fit" question only.

The block formula counts the tensors the Llama family saves (RMSNorm inputs in
float32, flash/flex attention's q, k, v, output and log-sum-exp, SwiGLU's gate, up
and, uncompiled, product); other families of the same shape differ by their extra norms only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from ft.training.adafactor import DEFAULT_MAX_CHUNK_NUMEL

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT_BYTES = 0.5 * GIB
FRAGMENTATION = 0.05


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    model_config: Any
    dtype: str = "bfloat16"
    """Compute dtype (float32, bfloat16, float16)."""
    mixed_precision: bool = True
    optimizer: str = "adamw"
    optimizer_in_backward: bool = False
    optimizer_cpu_offload: bool = False
    stochastic_rounding: bool = False
    activation_checkpointing: str = "none"
    activation_checkpointing_blocks: int | None = None
    """Only the first N blocks checkpointed (None: every block); the others keep all their activations."""
    activation_offloading: bool = False
    max_num_tokens: int = 4096
    loss_chunk_size: int = 1024
    dp_size: int = 1
    tp_size: int = 1
    data_parallelism: str = "fsdp"
    fsdp_reshard_after_forward: bool = True
    lora_rank: int | None = None
    """LoRA: only adapters of this rank on every linear layer train (an upper bound)."""
    lora_nf4: bool = False
    lora_fp8: bool = False
    """`fp8` with LoRA: the frozen block linears in float8 (one byte each, scales negligible)."""
    lora_embeddings_on_host: bool = False
    """`lora.embeddings_on_host`: the frozen input embedding table stays in host memory (no GPU bytes)."""
    compiled: bool = True
    """`torch_compile` on (the recipe's default on CUDA): a compiled block recomputes SwiGLU's
    product from the gate and up projections in backward instead of saving it."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank by component; `peak` is the predicted max allocated."""

    weights: float
    gradients: float
    optimizer_states: float
    step_transient: float
    activations: float
    loss_chunk: float
    output_gradient: float
    allocator_slack: float
    params_total: int
    params_trainable: int
    recompute: float = 0.0
    dequant_transient: float = 0.0

    @property
    def peak(self) -> float:
        # The NF4 dequantization of the linear being computed is alive inside each block, forward and backward.
        forward_end = self.activations + max(self.loss_chunk, self.dequant_transient) + self.output_gradient
        backward_start = self.activations + self.recompute + self.dequant_transient + self.output_gradient
        backward_end = self.gradients + self.step_transient
        return self.weights + self.optimizer_states + max(forward_end, backward_start, backward_end)

    @property
    def peak_with_slack(self) -> float:
        return self.peak + self.allocator_slack

    def components_gib(self) -> dict[str, float]:
        names = ("weights", "gradients", "optimizer_states", "step_transient", "activations", "recompute",
                 "dequant_transient", "loss_chunk", "allocator_slack")
        return {name: getattr(self, name) / GIB for name in names}


def parameter_shapes(model_config: Any) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter (tied ones once), from a meta-device build (no memory)."""
    from ft.models.family import build_meta_model

    model = build_meta_model(model_config, torch.float32)
    return {name: tuple(param.shape) for name, param in model.named_parameters()}


def _block_bytes_per_token(config: Any, compute_bytes: int, tp: int, compiled: bool = True) -> float:
    """Bytes one decoder block saves for backward per token, with no checkpointing."""
    dim, kv_dim, ffn = config.dim, config.n_kv_heads * config.head_dim, config.ffn_dim
    norms = 2 * (4 * dim)  # each RMSNorm saves its float32 input
    # norm outputs and linear inputs, q and attention output, k and v, SwiGLU's gate, up and product
    # (compiled, the product is recomputed from gate and up in backward: cheap pointwise work).
    ffn_saved = 2 if compiled else 3
    sharded = compute_bytes * (4 * dim / tp + 2 * dim / tp + 2 * kv_dim / tp + ffn_saved * ffn / tp) \
        + 4 * config.n_heads / tp
    return norms + sharded


def _selective_bytes_per_token(config: Any, compute_bytes: int, residual_bytes: int, tp: int) -> float:
    """Selective checkpointing keeps the block input, attention's output and every other matmul output."""
    dim, kv_dim, ffn = config.dim, config.n_kv_heads * config.head_dim, config.ffn_dim
    matmul_outputs = (3 * dim + 2 * kv_dim + 2 * ffn) / tp
    return residual_bytes * dim + compute_bytes * (2 * dim / tp + matmul_outputs / 2)


def _elementwise_bytes_per_token(config: Any, compute_bytes: int, residual_bytes: int, tp: int) -> float:
    """Elementwise checkpointing keeps the block input, attention's output and log-sum-exp, and the
    output of every matmul backward reads: q, k, v, o, gate and up (not down's: nothing reads it)."""
    dim, kv_dim, ffn = config.dim, config.n_kv_heads * config.head_dim, config.ffn_dim
    kept = (3 * dim + 2 * kv_dim + 2 * ffn) / tp
    return residual_bytes * dim + compute_bytes * kept + 4 * config.n_heads / tp


def predict_memory(plan: MemoryPlan, shapes: dict[str, tuple[int, ...]] | None = None) -> MemoryEstimate:
    from ft.training.optimizers import OPTIMIZERS

    config = plan.model_config
    shapes = shapes if shapes is not None else parameter_shapes(config)
    compute = DTYPE_BYTES[plan.dtype]
    mixed = plan.mixed_precision and plan.dtype != "float32"
    param_bytes = 4 if mixed else compute
    fsdp = plan.dp_size > 1 and plan.data_parallelism == "fsdp"
    shard = (plan.dp_size if fsdp else 1) * plan.tp_size
    numels = {name: math.prod(shape) for name, shape in shapes.items()}
    total = sum(numels.values())

    lora = plan.lora_rank is not None
    if lora:
        trainable_shapes = {f"{name}.lora": (plan.lora_rank * (shape[0] + shape[1]),)
                            for name, shape in shapes.items() if len(shape) == 2 and "embed" not in name}
    else:
        trainable_shapes = shapes
    trainable = sum(math.prod(s) for s in trainable_shapes.values())
    if lora:
        # QLoRA quantizes the blocks' linear weights (NF4: 4 bits and a float32 scale per 64), fp8 casts
        # them to one byte; embeddings, output layer and norms stay in the compute dtype.
        block_linear_numel = sum(_block_linear_numels(shapes))
        nf4_numel = block_linear_numel if plan.lora_nf4 else 0
        fp8_numel = block_linear_numel if plan.lora_fp8 and not plan.lora_nf4 else 0
        # With embeddings_on_host the input embedding table is in host memory.
        host_numel = numels.get("model.embed_tokens.weight", 0) if plan.lora_embeddings_on_host else 0
        frozen = nf4_numel * (0.5 + 4 / 64) + fp8_numel + (total - nf4_numel - fp8_numel - host_numel) * compute
        weights = (frozen + trainable * param_bytes) / shard
    else:
        weights = total * param_bytes / shard

    block_params = _block_params(shapes)
    checkpointed = _checkpointed_blocks(plan)
    uncheckpointed = config.n_layers - checkpointed
    if fsdp and mixed:  # compute-dtype copies gathered for the blocks in flight
        weights += (block_params * config.n_layers if not plan.fsdp_reshard_after_forward else 2 * block_params) \
            * compute / plan.tp_size
    elif mixed and plan.dp_size == 1 and uncheckpointed:
        # autocast's casts, saved for backward by the blocks that are not checkpointed; LoRA's frozen
        # base is stored in the compute dtype already, so only its (small) adapters are cast.
        cast = trainable if lora else total
        weights += cast * compute / plan.tp_size * uncheckpointed / config.n_layers

    grad_bytes = 4 if (fsdp and mixed) else param_bytes
    largest = max(math.prod(s) for s in trainable_shapes.values())
    if plan.optimizer_in_backward:
        gradients = 2 * largest * grad_bytes / plan.tp_size
        if fsdp:
            gradients = 2 * block_params * compute / plan.tp_size
    else:
        gradients = trainable * grad_bytes / shard

    kind = OPTIMIZERS.get(plan.optimizer, key="optimizer")
    float32_states = plan.stochastic_rounding and (not kind.native_stochastic_rounding
                                                   or kind.float32_states_when_rounding)
    state_element = 4 if float32_states else param_bytes
    if plan.optimizer_cpu_offload:
        states = 0.0
    else:
        states = sum(kind.state_bytes(shape, state_element) for shape in trainable_shapes.values()) / shard

    per_parameter = plan.optimizer_in_backward or plan.optimizer_cpu_offload or (
        plan.stochastic_rounding and not kind.native_stochastic_rounding)
    if plan.optimizer == "adafactor" and not plan.optimizer_cpu_offload:
        # ft's Adafactor: a few float32 temporaries of one row block (sharded tensors are stepped whole)
        block = largest / shard if fsdp else min(largest, DEFAULT_MAX_CHUNK_NUMEL)
        step_transient = 4 * 4 * block
    elif per_parameter:
        step_transient = largest * 8 / shard if (plan.stochastic_rounding or plan.optimizer_cpu_offload) else 0.0
    else:
        step_transient = 0.0
    if not plan.optimizer_cpu_offload:  # the optimizer's own intermediates for its largest parameter
        step_transient = max(step_transient, largest * kind.step_bytes_per_element / shard)

    tokens = plan.max_num_tokens
    # Autocast keeps the residual stream in the float32 embedding's dtype; LoRA's frozen embedding
    # is in the compute dtype (with lora.train_embeddings it is float32: slightly under-counted).
    residual = 4 if (mixed and not fsdp and not lora) else compute
    block = _block_bytes_per_token(config, compute, plan.tp_size, plan.compiled)
    # Backward reaches the checkpointed blocks only after freeing the activations of the blocks
    # after them; when any block is not checkpointed, those are at least the one recomputed block.
    recompute_per_token = block if checkpointed == config.n_layers else 0.0
    if plan.activation_checkpointing == "full":
        per_checkpointed_block = residual * config.dim
    elif plan.activation_checkpointing == "selective":
        per_checkpointed_block = _selective_bytes_per_token(config, compute, residual, plan.tp_size)
    elif plan.activation_checkpointing == "elementwise":
        per_checkpointed_block = _elementwise_bytes_per_token(config, compute, residual, plan.tp_size)
    else:
        per_checkpointed_block = block  # no block is checkpointed
    per_token = checkpointed * per_checkpointed_block + uncheckpointed * block
    if plan.activation_offloading and plan.activation_checkpointing == "full" and not uncheckpointed:
        # The block inputs go to the host; backward holds the one it recomputes and the next (prefetched).
        per_token = 2 * residual * config.dim
    elif plan.activation_offloading:
        per_token = min(per_token + recompute_per_token, 2 * block + config.n_layers * residual * config.dim / 8)
        recompute_per_token = 0.0
    # embedding output, final norm (float32 input) and its output, hidden states kept for the chunked loss.
    per_token += residual * config.dim + 4 * config.dim + 2 * compute * config.dim
    activations = tokens * per_token

    vocab = config.vocab_size / plan.tp_size
    # float32 logits and their exponentials (the compiled chunk fuses the rest; --profile-memory shows these two)
    loss_chunk = 2 * min(plan.loss_chunk_size, tokens) * vocab * 4
    output_numel = max((n for name, n in numels.items() if "lm_head" in name or "embed" in name), default=0)
    output_gradient = 0.0 if lora else output_numel * grad_bytes / shard

    estimate = MemoryEstimate(
        weights=weights, gradients=gradients, optimizer_states=states, step_transient=step_transient,
        activations=activations, loss_chunk=loss_chunk, output_gradient=output_gradient, allocator_slack=0.0,
        params_total=total, params_trainable=trainable, recompute=tokens * recompute_per_token,
        # torchao's NF4 linear dequantizes its whole weight per call through float32 intermediates: the
        # 8B QLoRA step's profile shows 0.66 GiB for its largest (14336 x 4096) weight, 12 bytes an element.
        dequant_transient=12 * max(_block_linear_numels(shapes)) if lora and plan.lora_nf4 else 0.0,
    )
    return dataclasses.replace(estimate, allocator_slack=FRAGMENTATION * estimate.peak + CUDA_CONTEXT_BYTES)


def _block_linear_numels(shapes: dict[str, tuple[int, ...]]) -> list[int]:
    """Sizes of the decoder blocks' linear weights (what QLoRA quantizes and LoRA's fp8 casts)."""
    return [math.prod(shape) for name, shape in shapes.items() if ".layers." in f".{name}" and len(shape) == 2]


def _checkpointed_blocks(plan: MemoryPlan) -> int:
    """How many blocks run under activation checkpointing: the first `activation_checkpointing_blocks`."""
    if plan.activation_checkpointing == "none":
        return 0
    n_layers = plan.model_config.n_layers
    return n_layers if plan.activation_checkpointing_blocks is None else min(plan.activation_checkpointing_blocks, n_layers)


def _block_params(shapes: dict[str, tuple[int, ...]]) -> int:
    """Parameters of one decoder block (block 0)."""
    return sum(math.prod(shape) for name, shape in shapes.items() if ".layers.0." in f".{name}")


def cheapest_fix(plan: MemoryPlan, budget_bytes: float, shapes: dict[str, tuple[int, ...]]) -> tuple[str, MemoryEstimate] | None:
    """The first setting change, in order of least cost to speed, under which the plan fits
    `budget_bytes`; None if none of the single or combined changes tried does."""
    candidates: list[tuple[str, dict[str, Any]]] = []
    partial = plan.activation_checkpointing != "none" and _checkpointed_blocks(plan) < plan.model_config.n_layers
    if partial:  # the blocks left unchecked are the cheapest memory to win back
        candidates.append(("activation_checkpointing_blocks=null", {"activation_checkpointing_blocks": None}))
    if plan.activation_checkpointing == "none":
        candidates.append(("activation_checkpointing=elementwise", {"activation_checkpointing": "elementwise"}))
    if plan.activation_checkpointing in ("none", "elementwise"):
        candidates.append(("activation_checkpointing=selective", {"activation_checkpointing": "selective"}))
    if plan.optimizer == "adamw" and plan.lora_rank is None:
        candidates.append(("optimizer=adafactor", {"optimizer": "adafactor"}))
    if plan.activation_checkpointing != "full":
        candidates.append(("activation_checkpointing=full" + (" activation_checkpointing_blocks=null" if partial else ""),
                           {"activation_checkpointing": "full", "activation_checkpointing_blocks": None}))
    if not plan.optimizer_in_backward:
        candidates.append(("optimizer_in_backward=true max_grad_norm=null", {"optimizer_in_backward": True}))
    if plan.mixed_precision and plan.dtype != "float32":
        candidates.append(("mixed_precision=false bf16_stochastic_rounding=true",
                           {"mixed_precision": False, "stochastic_rounding": True}))
    if plan.max_num_tokens > 1024:
        candidates.append((f"max_num_tokens={plan.max_num_tokens // 2} gradient_accumulation=2 (same tokens per step)",
                           {"max_num_tokens": plan.max_num_tokens // 2}))
    # Single changes first, then all of them so far together (the recipe for an 8B model on 24 GB).
    for label, change in candidates:
        estimate = predict_memory(dataclasses.replace(plan, **change), shapes)
        if estimate.peak_with_slack <= budget_bytes:
            return label, estimate
    combined: dict[str, Any] = {}
    labels: dict[str, str] = {}  # first changed key -> label, so a later choice of the same key replaces it
    for label, change in candidates:
        if "max_num_tokens" in change and combined.get("optimizer_in_backward"):
            continue  # in backward needs gradient_accumulation=1
        combined.update(change)
        labels[next(iter(change))] = label
        estimate = predict_memory(dataclasses.replace(plan, **combined), shapes)
        if estimate.peak_with_slack <= budget_bytes:
            return " ".join(labels.values()), estimate
    return None
