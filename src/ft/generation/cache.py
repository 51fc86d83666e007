"""`StaticKVCache`: the model's preallocated `KVCache` with every shape fixed, so a
decoding step can be captured once as a CUDA graph (or compiled) and replayed.

`ft.models.llama.model.KVCache` slices its buffers to the filled length and keeps
that length as a Python int, so each step has new shapes and a new slot baked in.
Here the next slot lives on the device (`slot`, a 0-d long tensor advanced in
place), new keys are written with `index_copy_` at that slot, and attention always
spans all `max_len` slots with a mask that hides the unfilled ones. Numerically the
two caches agree: masked slots get zero attention weight.

The cache is reused across batches of one `generate` call: `reset(prompt_mask_BT)`
starts a new batch without reallocating, so buffer addresses (and a captured graph)
stay valid.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ft.models.llama.model import KVCache, Llama


class StaticKVCache(KVCache):
    """A `KVCache` whose forward-time methods use only fixed shapes and device state.

    The filled length is `slot` on the device; the inherited Python `length` is not
    maintained (it stays 0), so pass `positions_BT` to the model explicitly.
    """

    def __init__(self, model: Llama, *, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        c = model.config
        weight = model.model.embed_tokens.weight
        # Under tensor parallelism each rank's attention holds only its share of the
        # heads (parallelize_llama divides the counts), so ask the module, not the config.
        n_kv_heads = model.model.layers[0].self_attn.n_kv_heads
        super().__init__(
            n_layers=c.n_layers, batch_size=batch_size, max_len=max_len, n_kv_heads=n_kv_heads,
            head_dim=c.head_dim, device=weight.device, dtype=dtype or weight.dtype,
        )
        device = weight.device
        self.slot = torch.zeros((), dtype=torch.long, device=device)
        self._slots_S = torch.arange(max_len, device=device)

    def reset(self, prompt_mask_BT: Tensor) -> None:
        """Start a new batch: slots [0, T) will hold the prompts, False at left padding."""
        B, T = prompt_mask_BT.shape
        if B != self.batch_size or T > self.max_len:
            raise ValueError(f"prompt mask {tuple(prompt_mask_BT.shape)} does not fit cache {self.batch_size} x {self.max_len}")
        self.slot.zero_()
        self.valid_BS.fill_(True)
        self.valid_BS[:, :T] = prompt_mask_BT.to(self.valid_BS.device, torch.bool)

    def update(self, layer: int, k_BNTH: Tensor, v_BNTH: Tensor) -> tuple[Tensor, Tensor]:
        """Write the T new keys/values at slots [slot, slot + T); return the whole buffers."""
        index_T = self.slot + self._slots_S[: k_BNTH.shape[2]]
        self.k[layer].index_copy_(2, index_T, k_BNTH)
        self.v[layer].index_copy_(2, index_T, v_BNTH)
        return self.k[layer], self.v[layer]

    def attention_mask(self, num_new: int) -> Tensor:
        """[B, 1, T, max_len]: causal over the filled slots, minus left padding."""
        q_slot_T1 = (self.slot + self._slots_S[:num_new])[:, None]
        k_slot_1S = self._slots_S[None, :]
        causal_TS = k_slot_1S <= q_slot_T1
        own_TS = k_slot_1S == q_slot_T1  # a padding query sees itself, so its row stays finite
        return (causal_TS[None] & (self.valid_BS[:, None, :] | own_TS[None]))[:, None]

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
