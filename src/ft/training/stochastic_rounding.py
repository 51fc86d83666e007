"""Stochastic rounding of float32 values to bfloat16, for pure-bf16 training.

A bf16 parameter updated in place loses every step smaller than half its last
bit (about 0.4% of its value): late in a run most AdamW updates are that small,
so round-to-nearest freezes the weights. Rounding up with probability equal to
the remainder keeps the expected value of the update, so small steps still move
the weights on average (Gupta et al., 2015; Zamirai et al., 2020).

The random bits come from a generator seeded by (seed, parameter index, step), so
the rounding is deterministic and a resumed run rounds exactly as the
uninterrupted one (no generator state to checkpoint). `hashed_round_to_bf16` takes
its bits from a hash of (key, element index) instead: plain integer arithmetic that
`torch.compile` fuses into the kernel doing the update (a generator object cannot be
traced), with the same guarantee.
"""

from __future__ import annotations

import torch

_LOW_BITS = 1 << 16  # bf16 is float32 with the low 16 bits dropped


def stochastic_round_to_bf16(x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """`x` (float32) rounded to bfloat16, up with probability equal to the dropped fraction.

    Adding uniform noise to the 16 dropped bits and truncating does it in integer
    arithmetic: for a negative number the bit pattern grows in magnitude the same way.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic rounding takes float32, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, _LOW_BITS, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((bits + noise) & -_LOW_BITS).view(torch.float32)
    # Non-finite values keep their class (the noise could turn inf into nan).
    rounded = torch.where(torch.isfinite(x), rounded, x)
    return rounded.to(torch.bfloat16)  # exact: the low bits are zero


def stochastic_round_into(out: torch.Tensor, x: torch.Tensor, *, generator: torch.Generator | None = None,
                          block_numel: int = 1 << 24) -> None:
    """`out.copy_(stochastic_round_to_bf16(x))` a block of elements at a time, so the
    temporaries (the noise, the sums) are one block's, not the tensor's: for an 8B
    model's embedding the whole-tensor version allocates several GiB at once."""
    if not (out.is_contiguous() and x.is_contiguous()):
        out.copy_(stochastic_round_to_bf16(x, generator=generator))
        return
    flat_out, flat_x = out.view(-1), x.view(-1)
    for start in range(0, flat_x.numel(), block_numel):
        end = start + block_numel
        flat_out[start:end] = stochastic_round_to_bf16(flat_x[start:end], generator=generator)


def rounding_generator(device: torch.device, *, seed: int, index: int, step: int) -> torch.Generator:
    """A generator for parameter `index` at optimizer step `step` of a run seeded `seed`."""
    generator = torch.Generator(device=device)
    # hash() of a tuple of ints is the same in every process (no hash randomisation for ints).
    generator.manual_seed(hash((seed, index, step)) & (2**63 - 1))
    return generator


_MASK32 = 0xFFFFFFFF


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int32 values (torch's `>>` keeps the sign bit)."""
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) in int32 arithmetic, whose
    products wrap modulo 2**32 (int64 would be exact but is several times slower on a
    GPU, where the rounding's bits cost more than the rest of the optimizer step)."""
    x = (x ^ _shift_right(x, 16)) * 0x7FEB352D
    x = (x ^ _shift_right(x, 15)) * 0x1B873593
    return x ^ _shift_right(x, 16)


def hashed_bits(key: torch.Tensor, offset: int, shape: torch.Size) -> torch.Tensor:
    """16 pseudo-random bits (int32) per element of a tensor of `shape` whose first element
    is element `offset` of its parameter, from `key` (a 0-d int32 tensor): the bits of an
    element do not depend on how the parameter is cut into blocks."""
    index = torch.arange(shape.numel(), dtype=torch.int64, device=key.device).view(shape) + offset
    index = (index & _MASK32).to(torch.int32)  # the low 32 bits (wraps to negative above 2**31)
    return _mix32(_mix32(index) ^ key) & (_LOW_BITS - 1)


def hashed_round_to_bf16(x: torch.Tensor, key: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """`x` (float32) rounded to bfloat16 stochastically, with the bits of `hashed_bits`."""
    bits = x.view(torch.int32)
    rounded = ((bits + hashed_bits(key, offset, x.shape)) & -_LOW_BITS).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


def rounding_key(*, seed: int, index: int, step: int) -> int:
    """The key (an int32 value) of parameter `index` at optimizer step `step` of a run seeded `seed`."""
    return (hash((seed, index, step)) & _MASK32) - (1 << 31)
