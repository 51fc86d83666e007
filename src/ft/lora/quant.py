"""NF4 base weights for QLoRA, through torchao's `NF4Tensor` (imported lazily).

torchao is PyTorch's own quantization library: its NF4 tensor is a tensor subclass
that FSDP2 can shard and that `linear_nf4` dequantizes block by block in the
backward, which is what torchtune's QLoRA uses; bitsandbytes' `Linear4bit` is a
module swap with CUDA-only kernels and no FSDP2 sharding of the packed weight.

Only the frozen base weights of adapted linears are quantized, after they are
loaded at full precision; everything a merge needs is re-read from the base
checkpoint, never dequantized from NF4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ft.errors import ConfigError


def _nf4_module():
    try:
        from torchao.dtypes import nf4tensor
    except ImportError:
        raise ConfigError(
            "lora.base_quantization=nf4 needs torchao (`pip install torchao`); it is not installed"
        ) from None
    return nf4tensor


def is_nf4(tensor: Tensor) -> bool:
    return type(tensor).__name__ == "NF4Tensor"


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear, dequantizing an NF4 weight to the input's dtype on the fly."""
    if is_nf4(weight):
        y = _nf4_module().linear_nf4(input=x, weight=weight)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def check_nf4_available(device: torch.device) -> None:
    """ConfigError when QLoRA cannot run here: no torchao, or a CPU device."""
    _nf4_module()
    if device.type != "cuda":
        raise ConfigError(
            f"lora.base_quantization=nf4 runs on CUDA GPUs only (device is {device.type}); "
            "use lora.base_quantization=none on this device"
        )
