"""NF4 base weights for QLoRA, through torchao's `NF4Tensor` (imported lazily).

torchao is PyTorch's own quantization library: its NF4 tensor is a tensor subclass
that FSDP2 can shard and that `linear_nf4` dequantizes block by block in the
backward, which is what torchtune's QLoRA uses; bitsandbytes' `Linear4bit` is a
module swap with CUDA-only kernels and no FSDP2 sharding of the packed weight.

Only the frozen base weights of adapted linears are quantized, after they are
loaded at full precision; everything a merge needs is re-read from the base
checkpoint, never dequantized from NF4. It runs on CPUs too (from float32 or
bfloat16). Under FSDP2 each weight is gathered, quantized whole and split by rows,
so every layout holds the same NF4 values; FSDP2 all-gathers the NF4 shards
through torchao's all-gather extension (`fsdp_pre_all_gather`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ft.errors import ConfigError

BLOCK_SIZE = 64  # weights per absmax scaler (torchao's and QLoRA's default)
MAX_SCALER_BLOCK_SIZE = 256  # scalers per quantization factor (the same)
SHARDABLE_FACTORS = 8  # keep at least this many quantization factors: FSDP2 splits them by rank


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


def check_nf4_available() -> None:
    """ConfigError when QLoRA cannot run here: torchao is not installed."""
    _nf4_module()


def scaler_block_size(numel: int) -> int:
    """Scalers per quantization factor for a weight of `numel` elements: torchao's 256
    where the weight is large enough, else the largest power of two that divides its
    scalers into `SHARDABLE_FACTORS` factors (small models' weights, which a fixed 256
    would not divide). It depends on the weight alone, so any layout quantizes alike."""
    n_scalers = numel // BLOCK_SIZE
    size = MAX_SCALER_BLOCK_SIZE
    while size > 1 and n_scalers % (size * SHARDABLE_FACTORS):
        size //= 2
    while n_scalers % size:  # fewer than SHARDABLE_FACTORS: one process only
        size //= 2
    return size


def to_nf4(weight: Tensor, *, dtype: torch.dtype, name: str) -> Tensor:
    """`weight` (a whole tensor) in NF4, dequantizing to `dtype`."""
    if weight.numel() % BLOCK_SIZE:
        raise ConfigError(f"lora.base_quantization=nf4: {name} has {weight.numel()} elements, not a multiple of "
                          f"NF4's block of {BLOCK_SIZE}; use lora.base_quantization=none, or leave this "
                          "projection out of lora.target_modules")
    return _nf4_module().to_nf4(weight.contiguous().to(dtype), BLOCK_SIZE, scaler_block_size(weight.numel()))


def quantize(weight: Tensor, *, dtype: torch.dtype, name: str) -> Tensor:
    """`weight` in NF4: a plain tensor whole; a DTensor sharded by FSDP2 (Shard(0), or
    HSDP's Replicate + Shard(0)) gathered, quantized whole and split into the same rows."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(weight, DTensor):
        return to_nf4(weight, dtype=dtype, name=name)
    placements = weight.placements
    shard_dims = [i for i, p in enumerate(placements) if p != Replicate()]
    if len(shard_dims) > 1 or any(placements[i] != Shard(0) for i in shard_dims):
        raise ConfigError(f"lora.base_quantization=nf4 shards NF4 base weights by rows only (FSDP2, HSDP); {name} "
                          f"is laid out as {placements} (tensor parallel?): use tensor_parallel_size=1 with QLoRA, "
                          "or lora.base_quantization=none")
    nf4 = to_nf4(weight.full_tensor(), dtype=dtype, name=name)
    if not shard_dims:
        local = nf4
    else:
        mesh_dim = shard_dims[0]
        shards, rank = weight.device_mesh.size(mesh_dim), weight.device_mesh.get_local_rank(mesh_dim)
        n_factors = nf4.quantization_factor.numel()
        if weight.shape[0] % shards or n_factors % shards:
            raise ConfigError(
                f"lora.base_quantization=nf4: {name} {tuple(weight.shape)} cannot be split evenly into NF4 shards "
                f"for {shards} FSDP processes (its rows and its {n_factors} quantization factors must divide by "
                f"{shards}); use a number of data-parallel processes that divides both, or "
                "lora.base_quantization=none"
            )
        chunk = nf4.chunk(shards, dim=0)[rank]
        local = nf4.new_zeros(chunk.shape)  # its own storage, not a view of the whole
        local.copy_(chunk)
    # Free the full-precision shard now (FSDP2 holds it until its lazy init). This also
    # lets that init adopt the NF4 shard: it compares storage pointers only while the old
    # one is allocated, and an NF4 tensor has no storage of its own to compare.
    weight.to_local().untyped_storage().resize_(0)
    return DTensor.from_local(local, weight.device_mesh, placements, run_check=False, shape=weight.shape,
                              stride=weight.stride())
