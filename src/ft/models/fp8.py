"""FP8 training: the model's linear layers computed in float8 through torchao.

`fp8` is one of "none" (the default: nothing changes), "tensorwise" (one scale per
tensor, cuBLAS's fp8 GEMM; the fastest) or "rowwise" (one scale per row, CUTLASS's
rowwise GEMM; more accurate when outliers dominate a tensor's scale). Both are
torchao's float8 training recipes (`Float8LinearConfig.from_recipe_name`): weights,
activations and gradients are cast to float8 just before each matmul, parameters,
gradients and optimizer states keep their dtype, so checkpoints and exports are
exactly those of a bf16 run.

`convert_to_fp8` swaps the chosen `nn.Linear`s for torchao's `Float8Linear` (an
`nn.Linear` subclass with the same parameter names). `ft.models.parallelize.parallelize_model`
calls it first, on the meta model, before tensor parallelism, activation
checkpointing, compile and FSDP, which is the order torchao and torchtitan use: compile
then fuses the scaling and casting into the neighbouring kernels, and with FSDP2 and
tensorwise scaling the weights are all-gathered in float8 (half the bytes).

Which layers stay in bf16 (`fp8_module_filter`):

- `lm_head`, the output projection: the trainer's fused cross-entropy reads
  `model.lm_head.weight` directly and never calls the module, so converting it
  would gain nothing; when embeddings are tied it is the embedding table, which
  is not a matmul weight; and the logits feed a softmax over the whole vocabulary,
  where float8's 3-bit mantissa costs most accuracy (torchtitan excludes it too).
- any linear whose input or output size is not a multiple of 16: the float8 GEMM
  (`torch._scaled_mm`) requires it, and padding would copy the tensors every call.

torchao is optional: it is imported only here, and only when `fp8` is not "none".

With LoRA (`lora.enabled=true`) nothing is converted here: the frozen base weights are
cast to float8 once after loading and computed by `ft.lora.float8_base` (no weight
gradient, no per-step weight cast), the adapters stay in their dtype.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Callable, Literal

import torch
from torch import nn

from ft.errors import ConfigError

log = logging.getLogger("ft")

Fp8Recipe = Literal["none", "tensorwise", "rowwise"]
FP8_RECIPES: tuple[str, ...] = ("none", "tensorwise", "rowwise")

# float8 tensor cores: Ada (8.9) and Hopper (9.0) and later.
MIN_COMPUTE_CAPABILITY = (8, 9)
# torch._scaled_mm's alignment rule for both dimensions of the weight.
FP8_ALIGNMENT = 16
KEEP_IN_BF16 = ("lm_head",)


def check_fp8_recipe(fp8: str, *, key: str = "fp8") -> None:
    if fp8 not in FP8_RECIPES:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(FP8_RECIPES)}, got {fp8!r}")


def check_fp8_support(fp8: str, device: torch.device | str, *, lora: bool = False,
                      dtype: torch.dtype = torch.bfloat16) -> None:
    """ConfigError unless `fp8` can run on `device` here: a CUDA GPU of compute
    capability >= 8.9 and torchao; with `lora`, torch's float8 matmul on `device` (the
    frozen base, `ft.lora.float8_base`) returning `dtype`. Cheap; call it before building."""
    check_fp8_recipe(fp8)
    if fp8 == "none":
        return
    device = torch.device(device)
    if lora:
        _check_lora_float8(fp8, device, dtype)
        return
    if device.type != "cuda":
        raise ConfigError(f"fp8={fp8} needs a CUDA GPU with float8 tensor cores (compute capability >= 8.9, "
                          f"e.g. H100, H200, L40S), but the device is {device.type!r}; use fp8=none")
    _check_capability(fp8, device)
    _torchao_float8(fp8)


def _check_lora_float8(fp8: str, device: torch.device, dtype: torch.dtype) -> None:
    """LoRA's frozen base in float8 (`ft.lora.float8_base`) needs torch's float8 matmul, not torchao:
    float8 tensor cores on a GPU; a CPU runs it where torch implements it (slowly: for tests)."""
    from ft.lora.float8_base import float8_matmul_available

    if device.type == "cuda":
        _check_capability(fp8, device)
    problem = float8_matmul_available(device, fp8, dtype)
    if problem is not None:
        raise ConfigError(f"fp8={fp8} with lora.enabled=true computes the frozen base with torch's float8 matmul, "
                          f"which this torch cannot run on {device.type!r} with {str(dtype).removeprefix('torch.')} "
                          f"results ({problem}); use fp8=none, or dtype=bfloat16")


def _check_capability(fp8: str, device: torch.device) -> None:
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_COMPUTE_CAPABILITY:
        raise ConfigError(
            f"fp8={fp8} needs float8 tensor cores (compute capability >= "
            f"{MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]}), but {torch.cuda.get_device_name(device)} has "
            f"{capability[0]}.{capability[1]}; use fp8=none"
        )


def _torchao_float8(fp8: str) -> Any:
    """torchao's float8 module, or a ConfigError saying how to get it."""
    try:
        return importlib.import_module("torchao.float8")
    except ImportError as error:
        raise ConfigError(f"fp8={fp8} needs torchao (pip install torchao), which could not be imported: {error}; "
                          "use fp8=none") from None


def fp8_module_filter(module: nn.Module, fqn: str) -> bool:
    """True for a linear layer to compute in float8 (see the module doc for why the
    others stay in bf16). torchao's `module_filter_fn(module, fully_qualified_name)`."""
    if not isinstance(module, nn.Linear):
        return False
    if fqn.split(".")[-1] in KEEP_IN_BF16:
        return False
    out_features, in_features = module.weight.shape
    return out_features % FP8_ALIGNMENT == 0 and in_features % FP8_ALIGNMENT == 0


def convert_to_fp8(
    model: nn.Module,
    fp8: str,
    *,
    device: torch.device | str,
    fsdp_float8_all_gather: bool = False,
    module_filter: Callable[[nn.Module, str], bool] = fp8_module_filter,
) -> list[str]:
    """Swap `model`'s linear layers chosen by `module_filter` for torchao's float8
    linears, in place; return their names. `fp8="none"` changes nothing.

    `fsdp_float8_all_gather`: wrap each converted weight so FSDP2 all-gathers it in
    float8 (torchao supports it for tensorwise scaling only; ignored otherwise).
    Call before compile and FSDP (`parallelize_model` does).
    """
    check_fp8_support(fp8, device)
    if fp8 == "none":
        return []
    float8 = _torchao_float8(fp8)
    config = float8.Float8LinearConfig.from_recipe_name(fp8)
    if fsdp_float8_all_gather and fp8 == "tensorwise":
        import dataclasses

        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    converted: list[str] = []

    def choose(module: nn.Module, fqn: str) -> bool:
        chosen = module_filter(module, fqn)
        if chosen:
            converted.append(fqn)
        return chosen

    float8.convert_to_float8_training(model, module_filter_fn=choose, config=config)
    kept = sorted(name for name, m in model.named_modules() if type(m) is nn.Linear)
    log.info("fp8=%s: %d linear layers in float8%s, kept in %s: %s", fp8, len(converted),
             " (FSDP all-gathers their weights in float8)" if config.enable_fsdp_float8_all_gather else "",
             "their dtype", ", ".join(kept) or "none")
    return converted


__all__ = ["FP8_RECIPES", "Fp8Recipe", "check_fp8_recipe", "check_fp8_support", "convert_to_fp8",
           "fp8_module_filter"]
