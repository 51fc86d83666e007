"""`FlexKeyMask`: a boolean attention mask that a model applies through FlexAttention
(as a score_mod) rather than SDPA; the generation cache hands it to decoding steps."""

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
