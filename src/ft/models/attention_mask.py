"""Masks that ask a model's attention for a kernel other than SDPA; the generation cache
hands them to decoding steps. `FlexKeyMask`: FlexAttention with the mask as a score_mod;
`DecodeKeyMask`: `ft.models.decode_attention.split_kv_decode_attention`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class FlexKeyMask:
    """A boolean mask [B, T, S] (True = attend) applied by FlexAttention as a score_mod.
    For decoding: with one query row against a cache, FlexAttention runs its decoding
    kernel, which splits the keys over thread blocks and reads each KV head once."""

    allowed_BTS: Tensor

    def score_mod(self):
        allowed_BTS = self.allowed_BTS

        def hide_masked(score, b, h, q_idx, kv_idx):
            return torch.where(allowed_BTS[b, q_idx, kv_idx], score, float("-inf"))

        return hide_masked


@dataclass(frozen=True)
class DecodeKeyMask:
    """The key mask of a one-token decoding step, [B, S] (True = attend): decoding has one
    query position, so causality and left padding are both a mask over key slots."""

    allowed_BS: Tensor
