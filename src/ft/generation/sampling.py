"""Choosing the next token from logits: greedy, and sampling with temperature,
top-k and top-p (nucleus) filtering, drawn from a seeded `torch.Generator`.

Everything here is a few tensor ops with no host synchronisation, so a decode loop
can run ahead of the GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor


def greedy_next(logits_BV: Tensor) -> Tensor:
    """The most likely token of each row [B]."""
    return logits_BV.argmax(dim=-1)


def filter_logits(logits_BV: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Float32 logits scaled by 1/temperature, with tokens outside the top-k and the
    top-p nucleus set to -inf. `top_k=0` and `top_p=1.0` turn those filters off.

    The nucleus is the smallest set of most likely tokens whose probability reaches
    `top_p`; the most likely token is always kept, so no row is left empty.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits_BV = logits_BV.float() / temperature
    V = logits_BV.shape[-1]
    if 0 < top_k < V:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        # Probability mass strictly before each token: a token is dropped once the
        # tokens ranked above it already reach top_p (so the first is always kept).
        mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV
        drop_sorted_BV = mass_before_BV >= top_p
        drop_BV = drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return logits_BV


def sample_next(
    logits_BV: Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row [B], drawn from the filtered distribution."""
    probs_BV = filter_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)
    return torch.multinomial(probs_BV, num_samples=1, generator=generator).squeeze(-1)


class TokenSampler:
    """The next-token rule of one generation config: greedy or seeded sampling.

    `greedy=True` or `temperature == 0` means greedy decoding; otherwise tokens are
    sampled and `seed` makes the draws repeatable (a private generator, so other
    users of the global RNG neither disturb nor are disturbed by it).
    """

    def __init__(
        self,
        *,
        greedy: bool,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int | None,
        device: torch.device,
    ) -> None:
        self.greedy = greedy or temperature == 0
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator: torch.Generator | None = None
        if not self.greedy:
            filter_logits(torch.zeros(1, 2), temperature=temperature, top_k=top_k, top_p=top_p)  # validate early
            self.generator = torch.Generator(device=device)
            if seed is not None:
                self.generator.manual_seed(seed)
            else:
                self.generator.seed()

    def __call__(self, logits_BV: Tensor) -> Tensor:
        if self.greedy:
            return greedy_next(logits_BV)
        return sample_next(
            logits_BV, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, generator=self.generator
        )
