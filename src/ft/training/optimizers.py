"""The optimizers a recipe can name (`optimizer=`), and the one builder that applies
the optimizer memory savers to them.

`OPTIMIZERS` (filled by `register_optimizers`):
- `adamw`: torch's AdamW (fused on GPU); states: 2 tensors of the parameter's dtype;
- `adamw8bit`, `adamw4bit`: AdamW with block-quantized states (torchao.optim);
  about 2 and 1 bytes of state per parameter (docs/optimizers.md: how closely they
  follow AdamW);
- `adafactor`: torch's Adafactor (factored second moment, no first moment): a few
  bytes per row and column of each matrix; stepped by `ft.training.adafactor` (the
  same rule and state, without host syncs, in row blocks, rounding stochastically
  itself). `learning_rate` is its relative step
  size (torch's semantics: the update is scaled by the parameter's RMS); `betas`
  and `eps` are not used.

`build_optimizer(model, settings)` returns a plain optimizer, or a
`PerParameterOptimizer` when a saver needs parameters stepped one at a time
(optimizer in backward, CPU offload, bf16 stochastic rounding).
`check_optimizer_settings` is the one place the combinations that cannot work are
refused, with the reason; the recipe config calls it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ft.errors import ConfigError
from ft.registry import Registry
from ft.training.optimizer_in_backward import PerParameterOptimizer

TORCHAO_HINT = "pip install torchao (a release built for your torch; see docs/optimizers.md)"


@dataclass(frozen=True, kw_only=True)
class OptimizerSettings:
    """The optimizer section of a recipe config."""

    name: str = "adamw"
    learning_rate: float
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    in_backward: bool = False
    cpu_offload: bool = False
    stochastic_rounding: bool = False
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class OptimizerKind:
    """How to make one optimizer, and what its state costs (for the memory model)."""

    make: Callable[[list[dict[str, Any]], OptimizerSettings, bool], torch.optim.Optimizer]
    """`make(param_groups, settings, on_cuda)`."""
    state_bytes: Callable[[tuple[int, ...], int], float]
    """Bytes of state for a parameter of this shape whose states are `element_size` bytes wide."""
    native_stochastic_rounding: bool = False
    """Rounds bf16 parameters stochastically itself (no per-parameter wrapper needed)."""
    float32_states_when_rounding: bool = False
    """With stochastic rounding, its states are float32 (as the wrapper's are)."""
    needs: str | None = None
    """The optional package it imports, for error messages."""
    step_bytes_per_element: float = 0.0
    """What its step allocates beside the states, in bytes per element of the parameter
    being stepped (one at a time); see the registrations."""


def _make_adamw(groups, settings: OptimizerSettings, on_cuda: bool) -> torch.optim.Optimizer:
    # fused AdamW is one kernel for all parameters on GPU; foreach is the fast path on CPU.
    kwargs = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=settings.learning_rate, betas=settings.betas, eps=settings.eps, **kwargs)


def _torchao_optim(name: str):
    try:
        import torchao.optim as ao_optim
    except ImportError:
        try:  # releases before torchao 0.11 kept them in the prototype namespace
            import torchao.prototype.low_bit_optim as ao_optim
        except ImportError:
            raise ConfigError(f"config key 'optimizer': {name} needs torchao, which is not installed; "
                              f"{TORCHAO_HINT}; or use optimizer=adamw or optimizer=adafactor") from None
    return ao_optim


def _make_low_bit(cls_name: str):
    def make(groups, settings: OptimizerSettings, on_cuda: bool) -> torch.optim.Optimizer:
        cls = getattr(_torchao_optim(settings.name), cls_name)
        return cls(groups, lr=settings.learning_rate, betas=settings.betas, eps=settings.eps,
                   bf16_stochastic_round=settings.stochastic_rounding)

    return make


def _make_adafactor(groups, settings: OptimizerSettings, on_cuda: bool) -> torch.optim.Optimizer:
    # torch's update rule and state, without its host syncs and full-size temporaries
    from ft.training.adafactor import Adafactor

    return Adafactor(groups, lr=settings.learning_rate, stochastic_rounding=settings.stochastic_rounding,
                     seed=settings.seed)


def _adam_state_bytes(shape: tuple[int, ...], element_size: int) -> float:
    return 2 * math.prod(shape) * element_size


def _quantized_state_bytes(bits: int, block_size: int):
    def state_bytes(shape: tuple[int, ...], element_size: int) -> float:
        numel = math.prod(shape)
        if numel < 4096 or numel % block_size:  # torchao keeps these states unquantized, in the parameter's dtype
            return 2 * numel * element_size
        return 2 * numel * (bits / 8 + 4 / block_size)

    return state_bytes


def _adafactor_state_bytes(shape: tuple[int, ...], element_size: int) -> float:
    if len(shape) < 2:
        return math.prod(shape) * element_size
    rows = math.prod(shape[:-1])
    return (rows + math.prod(shape[:-2]) * shape[-1]) * element_size


def register_optimizers(optimizers: Registry[OptimizerKind]) -> None:
    optimizers.register("adamw", OptimizerKind(make=_make_adamw, state_bytes=_adam_state_bytes))
    # torchao steps one parameter at a time in a compiled function. The 4-bit state packs two
    # codes a byte with strided slices, so the codes are materialised first, as int64 (its
    # binary search's dtype), with the float32 values they quantise: 2 x (8 + 4) bytes per
    # element of the parameter; the 1B shape's measured peak (the 262M-element embedding is
    # its largest parameter) is within 6% with this count. The 8-bit step fuses (no packing).
    optimizers.register("adamw8bit", OptimizerKind(make=_make_low_bit("AdamW8bit"), needs="torchao",
                                                   state_bytes=_quantized_state_bytes(8, 256),
                                                   native_stochastic_rounding=True))
    optimizers.register("adamw4bit", OptimizerKind(make=_make_low_bit("AdamW4bit"), needs="torchao",
                                                   state_bytes=_quantized_state_bytes(4, 128),
                                                   native_stochastic_rounding=True, step_bytes_per_element=24))
    optimizers.register("adafactor", OptimizerKind(make=_make_adafactor, state_bytes=_adafactor_state_bytes,
                                                   native_stochastic_rounding=True, float32_states_when_rounding=True))


OPTIMIZERS: Registry[OptimizerKind] = Registry("optimizer")
register_optimizers(OPTIMIZERS)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No decay on norms and biases (1-D parameters), as is standard for LLMs."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_optimizer_settings(settings: OptimizerSettings, *, gradient_accumulation: int, max_grad_norm: float | None,
                             dtype: str, mixed_precision: bool, nonfinite_policy: str, data_parallelism: str,
                             tensor_parallel_size: int, lora: bool) -> None:
    """Refuse the combinations that cannot work, each with the reason and the alternative."""
    OPTIMIZERS.get(settings.name, key="optimizer")
    if settings.in_backward:
        if max_grad_norm is not None:
            raise ConfigError(
                "config keys 'optimizer_in_backward' and 'max_grad_norm': clipping by the global gradient norm needs "
                "every gradient before the first parameter is stepped, but in backward each parameter is stepped as "
                "soon as its gradient is ready; set max_grad_norm=null (the norm is still reported), or "
                "optimizer_in_backward=false")
        if gradient_accumulation > 1:
            raise ConfigError(
                f"config keys 'optimizer_in_backward' and 'gradient_accumulation' ({gradient_accumulation}): the "
                f"optimizer in backward steps after every backward pass, so gradients cannot accumulate over "
                f"micro-batches; use gradient_accumulation=1 with a larger max_num_tokens, or optimizer_in_backward=false")
        if dtype == "float16":
            raise ConfigError(
                "config keys 'optimizer_in_backward' and 'dtype': float16 needs loss scaling, which checks all "
                "gradients for inf before any step; use dtype=bfloat16, or optimizer_in_backward=false")
        if nonfinite_policy == "skip_step":
            raise ConfigError(
                "config keys 'optimizer_in_backward' and 'nonfinite_policy': skip_step drops a step's update after "
                "seeing its gradient norm, but in backward the parameters are already stepped by then; use "
                "nonfinite_policy=stop, or optimizer_in_backward=false")
        if data_parallelism == "ddp":
            raise ConfigError(
                "config keys 'optimizer_in_backward' and 'data_parallelism': DDP averages gradients in buckets after "
                "the hooks that would step them have run; use data_parallelism=fsdp (one process is unaffected)")
    if settings.cpu_offload:
        if tensor_parallel_size > 1:
            raise ConfigError(
                "config keys 'optimizer_cpu_offload' and 'tensor_parallel_size': the host copies are plain tensors "
                "of one process; use tensor_parallel_size=1")
        if OPTIMIZERS.get(settings.name).needs is not None:
            raise ConfigError(
                f"config keys 'optimizer_cpu_offload' and 'optimizer' ({settings.name}): offloaded states live in "
                f"host memory, where the low-bit kernels do not run; use optimizer=adamw or optimizer=adafactor")
    if settings.stochastic_rounding:
        if mixed_precision or dtype not in ("bfloat16", "auto"):
            raise ConfigError(
                "config key 'bf16_stochastic_rounding' applies to bfloat16 parameters: set dtype=bfloat16 and "
                "mixed_precision=false (mixed precision keeps float32 master weights, which need no rounding)")
    if lora and settings.cpu_offload:
        raise ConfigError("config keys 'optimizer_cpu_offload' and 'lora.enabled': the adapters' states are small; "
                          "offloading them saves nothing, use optimizer_cpu_offload=false")


def build_optimizer(model: nn.Module, settings: OptimizerSettings, *, dp_size: int = 1) -> torch.optim.Optimizer:
    """The optimizer over `model`'s trainable parameters, with the savers `settings` asks for."""
    kind = OPTIMIZERS.get(settings.name, key="optimizer")
    if settings.cpu_offload and dp_size > 1:
        raise ConfigError("config key 'optimizer_cpu_offload': one process only for now (the host copies are not "
                          "sharded); run on one GPU, or use optimizer=adafactor / optimizer_in_backward=true under FSDP")
    groups = parameter_groups(model, settings.weight_decay)
    on_cuda = any(p.is_cuda for group in groups for p in group["params"])
    wrapper_rounds = settings.stochastic_rounding and not kind.native_stochastic_rounding
    if not (settings.in_backward or settings.cpu_offload or wrapper_rounds):
        return kind.make(groups, settings, on_cuda)
    inner_seeds = itertools.count()

    def make_inner(inner_groups):  # one parameter each: its own rounding seed
        inner_settings = dataclasses.replace(settings, seed=hash((settings.seed, next(inner_seeds))) & (2**62 - 1))
        return kind.make(inner_groups, inner_settings, on_cuda and not settings.cpu_offload)

    return PerParameterOptimizer(
        groups, make_inner,
        in_backward=settings.in_backward, cpu_offload=settings.cpu_offload, stochastic_rounding=wrapper_rounds,
        seed=settings.seed,
    )


def step_in_backward(optimizer: PerParameterOptimizer, scheduler) -> torch.Tensor:
    """The rest of a step whose parameters were stepped in backward: advance the schedule,
    return the gradient norm measured on the way."""
    optimizer.step()  # steps any parameter whose hook did not fire (none, normally)
    grad_norm = optimizer.grad_norm()
    scheduler.step()
    return grad_norm
