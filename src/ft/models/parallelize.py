"""Parallelism for any model family, applied from outside the model.

`parallelize_model(model, gangs, ...)` applies, in this order:

0. FP8 training (`fp8=tensorwise|rowwise`, `ft.models.fp8`): chosen linears become
   torchao float8 linears, so everything below (compile, FSDP's float8 all-gather)
   sees them;
1. the family's tensor-parallel plan (`ModelFamily.tp_plan`: data, module name
   pattern -> ParallelStyle) over the `tp` gang; attention reads its local head
   counts from tensor shapes, so no module attribute is edited;
2. activation checkpointing per block, by wrapping each block's forward in
   `torch.utils.checkpoint`, which keeps parameter names unchanged (a
   `checkpoint_wrapper` would insert `_checkpoint_wrapped_module.` into every name
   the checkpoint and HF export see) and FSDP's hooks outside the recomputed region;
3. `torch.compile` per block (`block.compile()`, names unchanged too);
4. FSDP2 `fully_shard` per block, then the root, over the `dp` gang (HSDP when
   `fsdp_replicas > 1`), or DDP (composable `replicate`) when asked.

Data-parallel gradients are averaged over the dp gang (torch's default for FSDP and
DDP): a trainer scales its summed loss by `dp_size / global_target_tokens`.

The model is built on the meta device, parallelized, materialized with
`to_empty(device=...)`, then loaded shard by shard with `ft.models.checkpoint.load_checkpoint`
(`ft.models.build.create_model` is that sequence):
no rank ever holds the full model. `iter_full_state_dict` gathers it back one tensor
at a time for export.
"""

from __future__ import annotations


import functools
from typing import Any, Iterator, Literal, get_args

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ft.errors import ConfigError
from ft.gang import Gangs
from ft.models.family import family_of

DataParallelism = Literal["fsdp", "ddp"]
ActivationCheckpointing = Literal["none", "full", "selective", "elementwise"]
ACTIVATION_CHECKPOINTING_MODES = get_args(ActivationCheckpointing)


def check_parallel_layout(
    config: Any,
    *,
    tensor_parallel_size: int,
    data_parallelism: str = "fsdp",
    activation_checkpointing: str = "none",
    activation_checkpointing_blocks: int | None = None,
) -> None:
    """ConfigError for a model/layout pair that cannot work; cheap, call it before building."""
    if data_parallelism not in ("fsdp", "ddp"):
        raise ConfigError(f"data_parallelism={data_parallelism!r} is not one of 'fsdp', 'ddp'")
    if activation_checkpointing not in ACTIVATION_CHECKPOINTING_MODES:
        modes = ", ".join(repr(mode) for mode in ACTIVATION_CHECKPOINTING_MODES)
        raise ConfigError(f"activation_checkpointing={activation_checkpointing!r} is not one of {modes}")
    check_checkpointed_blocks(activation_checkpointing_blocks, activation_checkpointing=activation_checkpointing,
                              n_layers=config.n_layers)
    tp = tensor_parallel_size
    if tp == 1:
        return
    if data_parallelism == "ddp":
        raise ConfigError(
            f"data_parallelism=ddp cannot be combined with tensor_parallel_size={tp}; use data_parallelism=fsdp"
        )
    sizes = {"n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads, "ffn_dim": config.ffn_dim,
             "vocab_size": config.vocab_size}
    for name, size in sizes.items():
        if size % tp:
            divisors = [d for d in range(1, size + 1) if size % d == 0 and d <= 64]
            raise ConfigError(
                f"tensor_parallel_size={tp} does not divide the model's {name}={size}; "
                f"use one of {divisors}"
            )


def check_checkpointed_blocks(blocks: int | None, *, activation_checkpointing: str, n_layers: int | None) -> None:
    """ConfigError for an `activation_checkpointing_blocks` value that cannot work
    (`n_layers`: the model's blocks, None when not known yet)."""
    if blocks is None:
        return
    if activation_checkpointing == "none":
        raise ConfigError(f"config key 'activation_checkpointing_blocks' ({blocks}) needs activation_checkpointing="
                          f"elementwise, selective or full; with activation_checkpointing=none no block is checkpointed: "
                          f"leave activation_checkpointing_blocks null")
    if blocks < 0 or (n_layers is not None and blocks > n_layers):
        limit = f"between 0 and the model's {n_layers} blocks" if n_layers is not None else "at least 0"
        raise ConfigError(f"config key 'activation_checkpointing_blocks' must be {limit}, or null for every "
                          f"block, got {blocks}")


def _checkpointed(forward, checkpoint, options: dict[str, Any]):
    """`forward` run under activation checkpointing. A plain function (not a
    functools.partial of torch's checkpoint), so torch.compile traces into it and
    compiles the block with its checkpoint instead of silently skipping the frame."""

    def checkpointed_forward(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **options, **kwargs)

    return checkpointed_forward


def _selective_checkpoint_context(every_other_matmul: bool = True):
    """Op-level selective checkpointing: keep the outputs of attention, collectives and
    the matmuls; recompute the rest (the elementwise ops between them: RMSNorm, RoPE,
    SwiGLU's product).

    `every_other_matmul` (activation_checkpointing=selective): keep only every second
    matmul's output and recompute the others, torchtitan's trade-off: about half the
    activation memory of keeping them all, for a sixth more compute than no
    checkpointing. Otherwise (`elementwise`) every matmul's output is kept: backward
    redoes elementwise work only (a few percent), and a compiled block keeps only the
    outputs its backward reads (not the down projection's), about 1.5x selective's
    memory. Saving none is full checkpointing."""
    from collections import Counter

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "_scaled_mm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"]
    save = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    if flex is not None:
        save.add(flex)
    c10d = getattr(torch.ops, "_c10d_functional", None)
    if c10d is not None:
        save |= {getattr(c10d, n).default for n in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor")
                 if hasattr(c10d, n)}
    # A float8 linear's matmul is `_scaled_mm`: it alternates with `mm` like a bf16 one,
    # so fp8 training keeps the memory of bf16 (torchtitan saves every `_scaled_mm`).
    mm = {aten.mm.default} | ({aten._scaled_mm.default} if hasattr(aten, "_scaled_mm") else set())
    # Forward and recompute count separately so both make the same choices.
    mm_counts: Counter = Counter()

    def policy(ctx, op, *args, **kwargs):
        if op in mm:
            mode = "recompute" if ctx.is_recompute else "forward"
            mm_counts[mode] += 1
            if every_other_matmul and mm_counts[mode] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def parallelize_model(
    model: nn.Module,
    gangs: Gangs,
    *,
    data_parallelism: DataParallelism = "fsdp",
    activation_checkpointing: ActivationCheckpointing = "none",
    activation_checkpointing_blocks: int | None = None,
    compile: bool = False,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    loss_parallel: bool = False,
    fp8: str = "none",
    sequence_parallel: bool = False,
    async_tp: bool = False,
) -> nn.Module:
    """Apply TP, activation checkpointing, compile and FSDP2/DDP to `model` in place
    (see the module doc) and return it. Build `model` on the meta device.

    FSDP is applied only when the dp gang has more than one process; its
    `MixedPrecisionPolicy(param_dtype, reduce_dtype)` computes in `param_dtype`
    (None: the parameters' dtype) and reduces gradients in `reduce_dtype`. DDP
    ignores `param_dtype` (use autocast). `activation_checkpointing`: "full"
    recomputes each whole block in backward; "selective" recomputes its
    elementwise ops and every second matmul, "elementwise" its elementwise ops only
    (see `_selective_checkpoint_context`); `activation_checkpointing_blocks`
    (None: all) checkpoints only the first N blocks of `model.model.layers` and lets the
    rest keep every activation: the last blocks run backward first, so theirs are freed
    first, and memory left over buys less recompute. `fp8`: "none", or torchao's
    float8 recipe for the linear layers ("tensorwise", "rowwise"; see `ft.models.fp8`).
    `async_tp`: with TP, sequence parallelism and compile on CUDA, overlap TP's collectives
    with the matmuls (`ft.models.async_tp`; the recipe checks those conditions).
    """
    tp_size, dp_size = gangs.tp.size, gangs.dp.size
    check_parallel_layout(
        model.config, tensor_parallel_size=tp_size, data_parallelism=data_parallelism,
        activation_checkpointing=activation_checkpointing, activation_checkpointing_blocks=activation_checkpointing_blocks,
    )
    fsdp = dp_size > 1 and data_parallelism == "fsdp"
    if fp8 != "none":
        from ft.models.fp8 import convert_to_fp8

        convert_to_fp8(model, fp8, device=gangs.device, fsdp_float8_all_gather=fsdp)
    layers = list(model.model.layers)

    if tp_size > 1:
        from torch.distributed.tensor.parallel import parallelize_module

        plan = family_of(model).tp_plan(loss_parallel)
        if sequence_parallel:
            plan = sequence_parallel_plan(plan)
        if async_tp:  # before the blocks compile: the pass runs when inductor lowers them
            from ft.models.async_tp import enable_async_tp

            enable_async_tp(gangs.tp_mesh.get_group().group_name)
        plan = _present_in(model, plan)
        parallelize_module(model, gangs.tp_mesh, _module_styles(model, plan))
        if sequence_parallel and hasattr(model.model, "norm"):
            # The trainer's loss reads the final norm's output whole (chunked through lm_head).
            from torch.distributed.tensor import Replicate, Shard
            from torch.distributed.tensor.parallel import PrepareModuleOutput

            parallelize_module(model.model.norm, gangs.tp_mesh, PrepareModuleOutput(
                output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True))
        # parallelize_module distributes lm_head's and embed_tokens' weight separately;
        # both are Shard(0) of the same [vocab, dim] matrix, so tying them again is exact.
        model.tie_weights()

    if activation_checkpointing != "none":
        from torch.utils.checkpoint import checkpoint

        every_other = activation_checkpointing == "selective"
        options = {} if activation_checkpointing == "full" else {
            "context_fn": functools.partial(_selective_checkpoint_context, every_other_matmul=every_other)}
        n_checkpointed = len(layers) if activation_checkpointing_blocks is None else activation_checkpointing_blocks
        for layer in layers[:n_checkpointed]:
            # Wrap forward only: FSDP's hooks stay outside the checkpointed region (so
            # the recompute sees the same ops as the forward) and names stay unchanged.
            layer.forward = _checkpointed(layer.forward, checkpoint, options)

    if compile:
        for layer in layers:
            layer.compile()

    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        for i, layer in enumerate(layers):
            # The last block's parameters are needed again at once by backward.
            fully_shard(layer, mesh=gangs.dp_mesh, mp_policy=mp_policy,
                        reshard_after_forward=reshard_after_forward and i < len(layers) - 1)
        # Root: embed_tokens, norm, lm_head (one unit, so tied weights stay one parameter).
        # Never resharded after forward: backward needs it at once, and a trainer that
        # computes the loss outside forward (chunked cross-entropy through
        # `model.lm_head.weight`) must find the unsharded weight there.
        fully_shard(model, mesh=gangs.dp_mesh, mp_policy=mp_policy, reshard_after_forward=False)
    elif dp_size > 1:
        from torch.distributed._composable.replicate import replicate

        replicate(model, device_mesh=gangs.dp_mesh_1d, bucket_cap_mb=100)
    return model


def sequence_parallel_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """`plan` (a family's TP plan) with sequence parallelism (Megatron-style, as
    torchtitan): between blocks the residual stream is sharded over the sequence
    (`Shard(1)`); the norms run on their shard (`SequenceParallel`, weights
    replicated, gradients reduced); attention and MLP all-gather their input
    (`PrepareModuleInput`) and their row-wise output projections reduce-scatter.
    The ft families have no dropout, so norms are the only sequence-wise modules."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, RowwiseParallel, SequenceParallel

    out = dict(plan)
    out["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    out["model.layers.*.self_attn.o_proj"] = RowwiseParallel(output_layouts=Shard(1))
    out["model.layers.*.mlp.down_proj"] = RowwiseParallel(output_layouts=Shard(1))
    out["model.layers.*.input_layernorm"] = SequenceParallel()
    out["model.layers.*.post_attention_layernorm"] = SequenceParallel()
    out["model.norm"] = SequenceParallel()
    # self_attn(x, cos, sin, mask, kv_cache): only x is sharded.
    out["model.layers.*.self_attn"] = PrepareModuleInput(
        input_layouts=(Shard(1), None, None, None, None), desired_input_layouts=(Replicate(), None, None, None, None),
        use_local_output=True)
    out["model.layers.*.mlp"] = PrepareModuleInput(
        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True)
    return out


def _matches(pattern: str, name: str) -> bool:
    """parallelize_module's rule: `*` within one name part."""
    import fnmatch

    parts, atoms = name.split("."), pattern.split(".")
    return len(parts) == len(atoms) and all(fnmatch.fnmatchcase(p, a) for p, a in zip(parts, atoms))


def _present_in(model: nn.Module, plan: dict[str, Any]) -> dict[str, Any]:
    """`plan` without the patterns no module of `model` matches: a pipeline stage holds
    only some of the model (torch would warn, printing the module, for each)."""
    names = [name for name, _ in model.named_modules(remove_duplicate=False)]
    return {pattern: style for pattern, style in plan.items() if any(_matches(pattern, name) for name in names)}


def _module_styles(model: nn.Module, plan: dict[str, Any]) -> dict[str, Any]:
    """`plan` with each module that wraps a linear (a LoRA adapter) given the style it
    asks for: such a module has `parallel_style(style)`, called with the style its
    pattern gives. Patterns that match one are expanded to explicit module names."""
    wrapped = {name: m for name, m in model.named_modules() if hasattr(m, "parallel_style")}
    if not wrapped:
        return plan

    resolved: dict[str, Any] = {}
    for pattern, style in plan.items():
        if not any(_matches(pattern, name) for name in wrapped):
            resolved[pattern] = style
            continue
        for name, module in model.named_modules():
            if _matches(pattern, name):
                resolved[name] = module.parallel_style(style) if name in wrapped else style
    return resolved


# ---------------------------------------------------------------------------------
# Loading and gathering


def _is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


@torch.no_grad()
def iter_full_state_dict(
    model: nn.Module, *, rank0_only: bool = True, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, Tensor]]:
    """Yield `(name, full tensor on CPU)` for each entry of `model.state_dict()`,
    gathering one DTensor at a time, so no rank holds more than one gathered tensor.

    Every rank must iterate to the end (each gather is a collective); with
    `rank0_only` the other ranks yield nothing. `dtype` casts floating tensors
    before the copy to CPU (e.g. bfloat16 for export).
    """
    from torch.distributed.tensor import DTensor

    emit = _is_main_process() or not rank0_only
    for name, tensor in model.state_dict().items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if not emit:
            del full
            continue
        if dtype is not None and full.is_floating_point():
            full = full.to(dtype)
        # clone: a plain parameter's CPU tensor would otherwise alias the live weight.
        yield name, full.detach().to("cpu", copy=True)
        del full


__all__ = ["check_checkpointed_blocks", "check_parallel_layout", "iter_full_state_dict", "parallelize_model", "sequence_parallel_plan"]
