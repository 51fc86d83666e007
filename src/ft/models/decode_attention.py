"""`split_kv_decode_attention`: split-KV ("flash-decoding") attention for one new query
token per row against a cache, which a model runs when the cache hands it a
`ft.models.attention_mask.DecodeKeyMask`.

A decoding step's attention reads every cached key and value once and does almost
no arithmetic, so it is bound by memory bandwidth; general attention kernels tile for
long query blocks and, with one query, leave most of the GPU idle or re-read keys per
query head. Here one Triton program takes one (row, KV head) pair and one stretch of
the keys: the G query heads that share the KV head are one [G, H] tile (padded to the
16 rows `tl.dot` needs), so each key and value is read once for all of them. When
rows x KV heads are too few to fill the GPU (small batches), the keys are split into
stretches whose partial softmax results (unnormalised output, row max, row sum) a
second kernel combines; otherwise one pass writes the output directly.

The mask is one boolean per (row, key slot): decoding has a single query position, so
causality and left padding are both a key mask. Every row must allow at least one key
(the cache always allows the new token's own slot).

Off the GPU (or without Triton) the op computes the same attention with SDPA; tests run
the kernels on the CPU through Triton's interpreter (`TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ft.models.attention_mask import DecodeKeyMask
from ft.triton_support import triton_usable

BLOCK_KEYS = 64
"""Keys per inner-loop tile of a program."""


def split_kv_decode_attention(q_BNTH: Tensor, k_BKSH: Tensor, v_BKSH: Tensor, mask: DecodeKeyMask) -> Tensor:
    """Attention of one query token per row [B, N, 1, H] over keys and values [B, K, S, H]
    (N a multiple of K: grouped-query heads, head n reading KV head n // (N / K)) under
    `mask`; [B, N, 1, H] like SDPA's output, with SDPA's default scale."""
    B, N, T, H = q_BNTH.shape
    if T != 1:
        raise ValueError(f"split-KV decoding attention takes one query token per row, got {T}")
    return torch.ops.ft.split_kv_decode_attention(q_BNTH, k_BKSH, v_BKSH, mask.allowed_BS)


@torch.library.custom_op("ft::split_kv_decode_attention", mutates_args=())
def _split_kv_decode_attention_op(q_BNTH: Tensor, k_BKSH: Tensor, v_BKSH: Tensor, allowed_BS: Tensor) -> Tensor:
    if triton_usable(q_BNTH.device):
        return _triton_decode_attention(q_BNTH, k_BKSH, v_BKSH, allowed_BS)
    return reference_decode_attention(q_BNTH, k_BKSH, v_BKSH, allowed_BS)


@_split_kv_decode_attention_op.register_fake
def _(q_BNTH: Tensor, k_BKSH: Tensor, v_BKSH: Tensor, allowed_BS: Tensor) -> Tensor:
    return torch.empty_like(q_BNTH)


def reference_decode_attention(q_BNTH: Tensor, k_BKSH: Tensor, v_BKSH: Tensor, allowed_BS: Tensor) -> Tensor:
    """The same attention through SDPA (GQA by repeating KV heads): the path off the GPU
    and the tests' reference."""
    G = q_BNTH.shape[1] // k_BKSH.shape[1]
    k_BNSH = k_BKSH.repeat_interleave(G, dim=1)
    v_BNSH = v_BKSH.repeat_interleave(G, dim=1)
    return F.scaled_dot_product_attention(q_BNTH, k_BNSH, v_BNSH, attn_mask=allowed_BS[:, None, None, :])


MIN_KEYS_PER_SPLIT = 128
"""Keys a split reads at least: a split of one 64-key tile costs its program's start-up
and a share of the combine for little reading (batch 1 on an H100: 384-512 keys took
7.8 us a layer in 64-key splits, 6.2 in 128-key ones)."""
MIN_SPLITS = 3
"""Fewer splits than this run as one direct pass: two splits and the combine kernel
took longer than one pass over up to 256 keys (batch 1 on an H100: 256 keys 5.2 us
against 5.0, 192 keys 5.1 against 4.1)."""


def num_splits_for(rows_x_kv_heads: int, num_keys: int, num_programs_wanted: int) -> tuple[int, int]:
    """(splits, keys per split): enough splits of the keys that rows x KV heads x splits
    reaches `num_programs_wanted`, each a whole number of `BLOCK_KEYS` tiles and at
    least `MIN_KEYS_PER_SPLIT` keys; one split (a direct pass) rather than fewer than
    `MIN_SPLITS`."""
    tiles = max(1, -(-num_keys // BLOCK_KEYS))
    max_splits = max(1, -(-num_keys // MIN_KEYS_PER_SPLIT))
    splits = min(tiles, max_splits, max(1, -(-num_programs_wanted // rows_x_kv_heads)))
    if splits < MIN_SPLITS:
        splits = 1
    keys_per_split = -(-tiles // splits) * BLOCK_KEYS
    return -(-num_keys // keys_per_split), keys_per_split


@functools.cache
def _programs_wanted(device_index: int | None) -> int:
    # Two programs per multiprocessor keep every one busy while others wait on memory.
    if device_index is None:
        return 8
    return 2 * torch.cuda.get_device_properties(device_index).multi_processor_count


def _triton_decode_attention(q_BNTH: Tensor, k_BKSH: Tensor, v_BKSH: Tensor, allowed_BS: Tensor) -> Tensor:
    import triton

    from ft.models import decode_attention_kernels as kernels

    B, N, _, H = q_BNTH.shape
    K, S = k_BKSH.shape[1], k_BKSH.shape[2]
    G = N // K
    # The kernels take any strides but the last (a head's vector is read as one row).
    q_BKGH, k_BKSH, v_BKSH, allowed_BS = (
        t if t.stride(-1) == 1 else t.contiguous() for t in (q_BNTH.reshape(B, K, G, H), k_BKSH, v_BKSH, allowed_BS))
    out_BKGH = torch.empty((B, K, G, H), dtype=q_BNTH.dtype, device=q_BNTH.device)
    allowed_BS = allowed_BS.view(torch.uint8) if allowed_BS.dtype == torch.bool else allowed_BS
    block_g = max(16, triton.next_power_of_2(G))
    block_h = max(16, triton.next_power_of_2(H))
    device_index = q_BNTH.device.index if q_BNTH.is_cuda else None
    splits, keys_per_split = num_splits_for(B * K, S, _programs_wanted(device_index))
    direct = splits == 1
    if direct:
        part_o = part_m = part_l = out_BKGH  # unused: the single pass writes the output
    else:
        part_o = torch.empty((B * K, splits, block_g, block_h), dtype=torch.float32, device=q_BNTH.device)
        part_m = torch.empty((B * K, splits, block_g), dtype=torch.float32, device=q_BNTH.device)
        part_l = torch.empty_like(part_m)
    scale_log2 = math.log2(math.e) / math.sqrt(H)
    kernels.split_kv_partial[(B * K, splits)](
        q_BKGH, k_BKSH, v_BKSH, allowed_BS, out_BKGH, part_o, part_m, part_l,
        *q_BKGH.stride()[:3], *k_BKSH.stride()[:3], *v_BKSH.stride()[:3], allowed_BS.stride(0),
        *out_BKGH.stride()[:3],
        K, G, H, S, keys_per_split, splits, scale_log2,
        BLOCK_G=block_g, BLOCK_S=BLOCK_KEYS, BLOCK_H=block_h, DIRECT=direct,
        IEEE=q_BKGH.dtype == torch.float32,
        num_warps=4,
    )
    if not direct:
        kernels.split_kv_combine[(B * K,)](
            part_o, part_m, part_l, out_BKGH, *out_BKGH.stride()[:3],
            K, G, H, splits,
            BLOCK_G=block_g, BLOCK_H=block_h, BLOCK_SPLITS=max(2, triton.next_power_of_2(splits)),
            num_warps=4,
        )
    return out_BKGH.reshape(B, N, 1, H)
