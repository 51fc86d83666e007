"""Choosing the next token from logits: greedy, and sampling with temperature,
top-k and top-p (nucleus) filtering, drawn from a seeded `torch.Generator`.

Everything here is a few tensor ops with no host synchronisation, so a decode loop
can run ahead of the GPU.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger("ft")

# Tokens `top_p` looks at before it falls back to sorting the whole vocabulary.
NUCLEUS_CANDIDATES = 1024


def greedy_next(logits_BV: Tensor) -> Tensor:
    """The most likely token of each row [B]."""
    return logits_BV.argmax(dim=-1)


def token_logprobs(logits_BV: Tensor, tokens_B: Tensor) -> Tensor:
    """log p(tokens_B) under softmax(logits_BV) in float32 [B]: the token's logit minus
    the row's logsumexp, without materialising a float32 copy of the logits when
    compiled (`pick_and_score`)."""
    chosen_B = logits_BV.gather(1, tokens_B[:, None]).squeeze(1).float()
    return chosen_B - torch.logsumexp(logits_BV.float(), dim=-1)


PICK_PARALLELISM = 64
"""Rows x vocabulary chunks the greedy pick reduces at once: fewer rows than this split
each row's vocabulary into chunks (see `greedy_and_logprobs`)."""


def greedy_and_logprobs(logits_BV: Tensor) -> tuple[Tensor, Tensor]:
    """The most likely token of each row [B] and its log-probability in float32 [B].

    With few rows the vocabulary is reduced in two stages, chunks first: compiled, a
    row's reduction over a 128k vocabulary is otherwise one program, 26-29 us of a batch-1
    decode step on an H100. The token is the same as `greedy_next`'s (the first of
    equal maxima); the log-probability is the same up to float32 rounding."""
    B, V = logits_BV.shape
    chunks = min(PICK_PARALLELISM // max(B, 1), V)
    if chunks <= 1:
        next_B = greedy_next(logits_BV)
        return next_B, token_logprobs(logits_BV, next_B)
    width = -(-V // chunks)
    # -inf padding never wins the argmax and adds nothing to the sum of exponentials.
    padded_BCW = torch.nn.functional.pad(logits_BV, (0, chunks * width - V), value=float("-inf"))
    padded_BCW = padded_BCW.view(B, chunks, width)
    chunk_arg_BC = padded_BCW.argmax(dim=-1)  # argmax: the first of equal maxima
    chunk_max_BC = padded_BCW.amax(dim=-1).float()
    shifted_BCW = padded_BCW.float() - chunk_max_BC[..., None]
    # A chunk of only -inf (a masked stretch of the vocabulary) adds 0, not nan.
    chunk_sum_BC = torch.where(chunk_max_BC == float("-inf"), 0.0, shifted_BCW.exp().sum(dim=-1))
    best_chunk_B = chunk_max_BC.argmax(dim=-1)  # the first chunk holding the maximum
    row_max_B = chunk_max_BC.gather(1, best_chunk_B[:, None]).squeeze(1)
    next_B = best_chunk_B * width + chunk_arg_BC.gather(1, best_chunk_B[:, None]).squeeze(1)
    scaled_B = (chunk_sum_BC * (chunk_max_BC - row_max_B[:, None]).exp()).sum(dim=-1)
    return next_B, -scaled_B.log()


_compiled: dict[str, object] = {}


def _on_cuda_compiled(name: str, fn):
    """`fn` under torch.compile, made once per process; `fn` itself once compiling has
    failed (e.g. no compiler toolchain), with a warning. Over a 128k vocabulary, eager
    argmax and log_softmax run one block per row: at batch 1 they took 65 us a token
    on an H100, against a 1.4 ms decode step; inductor splits the reductions."""
    if name not in _compiled:
        compiled = torch.compile(fn, dynamic=False)

        def run(*args):
            try:
                return compiled(*args)
            except Exception as error:
                log.warning("the compiled %s token picker failed, running it eagerly: %s", name, error)
                _compiled[name] = fn
                return fn(*args)

        _compiled[name] = run
    return _compiled[name]


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
    kept = _kept_candidates(logits_BV, top_k=top_k, top_p=top_p)
    if kept is None:
        return logits_BV
    values_BK, order_BK = kept
    return torch.full_like(logits_BV, float("-inf")).scatter(-1, order_BK, values_BK)


def _kept_candidates(logits_BV: Tensor, *, top_k: int, top_p: float) -> tuple[Tensor, Tensor] | None:
    """(logits [B, K], token ids [B, K]) of the tokens that may be drawn, most likely
    first, -inf where top-p drops one; None when no filter is on.

    Without a full-vocabulary sort: top-p looks at the `NUCLEUS_CANDIDATES` most
    likely tokens (or the top-k) and sorts the whole row only when they hold less
    than top_p of the mass (a sort per step cost 90x a greedy step on a CPU).
    """
    V = logits_BV.shape[-1]
    top_k = top_k if 0 < top_k < V else 0
    if not top_k and top_p >= 1.0:
        return None
    k = top_k or min(V, NUCLEUS_CANDIDATES)
    values_BK, order_BK = torch.topk(logits_BV, k, dim=-1)  # sorted, most likely first
    if top_p >= 1.0:
        return values_BK, order_BK
    if top_k or k == V:
        probs_BK = values_BK.softmax(dim=-1)  # (top-k first, then the nucleus within it)
    else:
        probs_BK = (values_BK - torch.logsumexp(logits_BV, dim=-1, keepdim=True)).exp()
    cumulative_BK = probs_BK.cumsum(dim=-1)
    if not top_k and k < V and not bool((cumulative_BK[:, -1] >= top_p).all()):  # one host sync per step
        values_BK, order_BK = torch.sort(logits_BV, dim=-1, descending=True)
        probs_BK = values_BK.softmax(dim=-1)
        cumulative_BK = probs_BK.cumsum(dim=-1)
    # Probability mass strictly before each token: a token is dropped once the tokens
    # ranked above it already reach top_p (so the first is always kept).
    drop_BK = (cumulative_BK - probs_BK) >= top_p
    return values_BK.masked_fill(drop_BK, float("-inf")), order_BK


def sample_next(
    logits_BV: Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row [B], drawn from the filtered distribution (over the kept
    candidates only when a filter is on: a multinomial over the full vocabulary is
    itself slow on a CPU)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits_BV = logits_BV.float() / temperature
    kept = _kept_candidates(logits_BV, top_k=top_k, top_p=top_p)
    if kept is None:
        return torch.multinomial(logits_BV.softmax(dim=-1), num_samples=1, generator=generator).squeeze(-1)
    values_BK, order_BK = kept
    drawn_B1 = torch.multinomial(values_BK.softmax(dim=-1), num_samples=1, generator=generator)
    return order_BK.gather(-1, drawn_B1).squeeze(-1)


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

    def pick_and_score(self, logits_BV: Tensor, *, compile: bool = False) -> tuple[Tensor, Tensor]:
        """(next tokens [B], their float32 log-probabilities under the unfiltered
        temperature-1 distribution [B]). `compile` (CUDA only): greedy picking and
        scoring run as one compiled function, the scoring alone after sampling."""
        compile = compile and logits_BV.is_cuda
        if self.greedy:
            if compile:
                return _on_cuda_compiled("greedy", greedy_and_logprobs)(logits_BV)
            return greedy_and_logprobs(logits_BV)
        next_B = self(logits_BV)
        score = _on_cuda_compiled("score", token_logprobs) if compile else token_logprobs
        return next_B, score(logits_BV, next_B)
