"""`StaticKVCache`: preallocated keys/values of every layer for incremental decoding,
with every shape fixed, so a decoding step can be captured once as a CUDA graph (or
compiled) and replayed.

Layout: `k[i]`, `v[i]` are [B, n_kv_heads, max_len, head_dim] for layer i. The next
slot lives on the device (`slot`, a 0-d long tensor advanced in place), new keys are
written with `index_copy_` at that slot, and attention spans a window of the first
`window_len` slots with a mask that hides the unfilled ones and the left padding of
each prompt (`valid_BS`). The model is called with explicit `positions_BT`.

The window: reading keys and values is most of a decode step's attention time, and
slots beyond the filled ones hold nothing. `DecodeStep` therefore narrows the window
to the filled slots rounded up to a bucket (`window_for`: at most `MAX_BUCKETS`
lengths per cache, multiples of 16 so the attention kernel's mask stays aligned):
shapes stay fixed within a bucket (one CUDA graph per bucket), and masked slots add
exactly zero to the softmax, so the result is the full-length one. Prefill and
direct model calls use the whole cache (`reset` restores it). The window is a
tensor (`window_S`, a view of slot indices), so torch.compile can treat its length
as a dynamic size and compile once for every bucket.

The buffers take their head count and head size from the first keys written (the
prefill): under tensor parallelism a rank holds only its share of the heads, and
the cache needs no family-specific knowledge to find out how many.

The cache is reused across batches of one `generate` call: `reset(prompt_mask_BT)`
starts a new batch without reallocating, so buffer addresses (and a captured graph)
stay valid.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ft.models.attention_mask import DecodeKeyMask, FlexKeyMask

MAX_BUCKETS = 8
_ALIGN = 16


class StaticKVCache:
    """Keys/values of `n_layers` layers for `batch_size` rows of up to `max_len` tokens."""

    def __init__(self, model: nn.Module, *, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        weight = model.model.embed_tokens.weight
        device = weight.device
        self.n_layers = model.config.n_layers
        self.max_len = max_len
        self.dtype = dtype or weight.dtype
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self.valid_BS = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.slot = torch.zeros((), dtype=torch.long, device=device)
        self._slots_S = torch.arange(max_len, device=device)
        self.window_S = self._slots_S  # slot indices attention spans: a prefix of the cache
        self.next_slot = 0
        """The slot the next token goes to, on the host (`slot` without a sync): set by
        `reset` for the prefill, advanced by `DecodeStep`."""
        self._bucket = max(_ALIGN, -(-max_len // (MAX_BUCKETS * _ALIGN)) * _ALIGN)
        self.decode_kernel: str | None = None
        """The attention kernel of decoding steps (one new token): None, SDPA; "flex",
        FlexAttention's decoding kernel (the mask as a `FlexKeyMask`); "split_kv",
        `ft.models.decode_attention` (the mask as a `DecodeKeyMask`). Prefill stays on SDPA."""

    @property
    def batch_size(self) -> int:
        return self.valid_BS.shape[0]

    def reset(self, prompt_mask_BT: Tensor) -> None:
        """Start a new batch: slots [0, T) will hold the prompts, False at left padding."""
        B, T = prompt_mask_BT.shape
        if B != self.batch_size or T > self.max_len:
            raise ValueError(f"prompt mask {tuple(prompt_mask_BT.shape)} does not fit cache {self.batch_size} x {self.max_len}")
        self.slot.zero_()
        self.next_slot = T
        self.window_S = self._slots_S
        self.valid_BS.fill_(True)
        self.valid_BS[:, :T] = prompt_mask_BT.to(self.valid_BS.device, torch.bool)

    @property
    def window_len(self) -> int:
        return self.window_S.shape[0]

    def window_for(self, num_slots: int) -> int:
        """The window length covering slots [0, num_slots): `num_slots` rounded up to the
        bucket size (a multiple of 16, at most MAX_BUCKETS buckets), at most max_len."""
        return min(self.max_len, -(-num_slots // self._bucket) * self._bucket)

    def set_window(self, length: int) -> None:
        """Attend over slots [0, length) until the next `set_window` or `reset`."""
        if not 0 < length <= self.max_len:
            raise ValueError(f"window of {length} slots does not fit cache of {self.max_len}")
        self.window_S = self._slots_S.narrow(0, 0, length)

    def update(self, layer: int, k_BNTH: Tensor, v_BNTH: Tensor) -> tuple[Tensor, Tensor]:
        """Write the T new keys/values at slots [slot, slot + T); return the keys and
        values of the window [B, K, window_len, H] (views of the buffers)."""
        if not self.k:
            self._allocate(k_BNTH.shape[1], k_BNTH.shape[3])
        index_T = self.slot + self._slots_S[: k_BNTH.shape[2]]
        self.k[layer].index_copy_(2, index_T, k_BNTH)
        self.v[layer].index_copy_(2, index_T, v_BNTH)
        # narrow, not [:S]: a slice as long as the buffer would make torch.compile
        # specialize the window's length to a constant.
        S = self.window_S.shape[0]
        return self.k[layer].narrow(2, 0, S), self.v[layer].narrow(2, 0, S)

    def _allocate(self, n_kv_heads: int, head_dim: int) -> None:
        shape = (self.batch_size, n_kv_heads, self.max_len, head_dim)
        device = self.valid_BS.device
        self.k = [torch.zeros(shape, device=device, dtype=self.dtype) for _ in range(self.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=self.dtype) for _ in range(self.n_layers)]

    def attention_mask(self, num_new: int) -> Tensor | FlexKeyMask | DecodeKeyMask:
        """[B, 1, T, window_len]: causal over the filled slots, minus left padding (for a
        decoding step under `decode_kernel`: the same as a `FlexKeyMask` [B, T, window_len]
        or a `DecodeKeyMask` [B, window_len])."""
        q_slot_T1 = (self.slot + self._slots_S[:num_new])[:, None]
        k_slot_1S = self.window_S[None, :]
        causal_TS = k_slot_1S <= q_slot_T1
        own_TS = k_slot_1S == q_slot_T1  # a padding query sees itself, so its row stays finite
        valid_B1S = self.valid_BS.narrow(1, 0, self.window_S.shape[0])[:, None, :]
        allowed_BTS = causal_TS[None] & (valid_B1S | own_TS[None])
        if self.decode_kernel == "flex" and num_new == 1:
            return FlexKeyMask(allowed_BTS)
        if self.decode_kernel == "split_kv" and num_new == 1:
            return DecodeKeyMask(allowed_BTS[:, 0])
        return allowed_BTS[:, None]

    def advance(self, num_new: int) -> None:
        self.slot.add_(num_new)

    def reorder(self, indices_B: Tensor) -> None:
        """Rows `indices_B` in that order (beam search), copied in place so the buffers
        keep their addresses; the number of rows cannot change."""
        if indices_B.shape[0] != self.batch_size:
            raise ValueError(f"StaticKVCache.reorder keeps {self.batch_size} rows, got {indices_B.shape[0]} indices")
        indices_B = indices_B.to(self.valid_BS.device)
        for buffer in (*self.k, *self.v, self.valid_BS):
            buffer.copy_(buffer.index_select(0, indices_B))
