"""`GreedyLoopState`: the greedy decode loop's tensors, kept on the device and written in
place by each step, so that one step (the forward, the pick, the loop's bookkeeping) is
one function (`ft.generation.decode_step.greedy_decode_forward`) that `DecodeStep.greedy` compiles and captures into one CUDA graph.

Picking and bookkeeping outside the graph cost a decode step of the 1B shape about
0.13 ms at batch 1 and 0.19 ms at batch 64 on an H100 (a dozen small kernels and their
launches each step, against a 1.36 / 1.75 ms graph); inside it, inductor fuses them into
the pick's reductions and the host only replays the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import Tensor

from ft.generation.sampling import greedy_and_logprobs

# No token has this id: the stop set of a loop without stop ids (isin over an empty set
# gives shapes of size 0, which some compiled paths handle poorly).
_NO_STOP = -1


@dataclass
class GreedyLoopState:
    """Device tensors of one greedy batch; `t` is the step whose token is written next."""

    tokens_B1: Tensor
    """The last picked token of each row: the next step's input."""
    positions_B1: Tensor
    """The position of `tokens_B1`."""
    done_B: Tensor
    """Rows that are dummies or have picked a stop id."""
    lengths_B: Tensor
    """Tokens generated per row (the stop id included)."""
    stop_S: Tensor
    tokens_BL: Tensor
    logprobs_BL: Tensor
    t: Tensor
    """0-d long: the column of `tokens_BL` the next pick goes to."""

    @classmethod
    def allocate(cls, batch_size: int, max_gen_len: int, stop_ids: Sequence[int], device: torch.device) -> "GreedyLoopState":
        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        stop_S = torch.tensor(list(stop_ids) or [_NO_STOP], dtype=torch.long, device=device)
        return cls(
            tokens_B1=zeros(batch_size, 1), positions_B1=zeros(batch_size, 1),
            done_B=zeros(batch_size, dtype=torch.bool), lengths_B=zeros(batch_size), stop_S=stop_S,
            tokens_BL=zeros(batch_size, max_gen_len), logprobs_BL=zeros(batch_size, max_gen_len, dtype=torch.float32),
            t=zeros(),
        )

    def matches(self, batch_size: int, max_gen_len: int, stop_ids: Sequence[int]) -> bool:
        stops = list(stop_ids) or [_NO_STOP]
        return tuple(self.tokens_BL.shape) == (batch_size, max_gen_len) and self.stop_S.tolist() == stops

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def start(self, logits_BV: Tensor, positions_B1: Tensor, real_B: Tensor) -> None:
        """A new batch: its first pick, from the prefill's logits, at step 0."""
        self.tokens_BL.zero_()
        self.logprobs_BL.zero_()
        self.lengths_B.zero_()
        self.t.zero_()
        self.done_B.copy_(~real_B)
        self.positions_B1.copy_(positions_B1)
        record_pick(*self.tensors(), *greedy_and_logprobs(logits_BV))

    def snapshot(self) -> list[Tensor]:
        return [t.clone() for t in self.tensors()]

    def restore(self, snapshot: list[Tensor]) -> None:
        for tensor, saved in zip(self.tensors(), snapshot):
            tensor.copy_(saved)


def record_pick(tokens_B1: Tensor, positions_B1: Tensor, done_B: Tensor, lengths_B: Tensor, stop_S: Tensor,
                tokens_BL: Tensor, logprobs_BL: Tensor, t: Tensor, next_B: Tensor, logprob_B: Tensor) -> None:
    """Write step `t`'s picks in place: a finished row records 0 / 0.0 and stays finished."""
    del positions_B1  # advanced by the forward's caller; here for the tensors' fixed order
    next_B = next_B.masked_fill(done_B, 0)
    column = t.view(1)
    tokens_BL.index_copy_(1, column, next_B[:, None])
    logprobs_BL.index_copy_(1, column, logprob_B.masked_fill(done_B, 0.0)[:, None])
    lengths_B.add_((~done_B).long())
    done_B.logical_or_(torch.isin(next_B, stop_S))
    tokens_B1.copy_(next_B[:, None])
    t.add_(1)

