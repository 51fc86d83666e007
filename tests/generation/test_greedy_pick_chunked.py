"""The greedy pick with few rows reduces the vocabulary in chunks first; it must give
the one-stage pick's tokens exactly and its log-probabilities to float32 rounding."""

import pytest
import torch

from ft.generation import sampling


def one_stage(logits_BV):
    next_B = sampling.greedy_next(logits_BV)
    return next_B, sampling.token_logprobs(logits_BV, next_B)


def awkward_logits(B: int, V: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(B * 1000 + V)
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype)
    top = logits[0].max() + 1
    logits[0, 5] = top  # a tie: the first index must win, also across chunks
    logits[0, V - 1] = top
    if B > 1:
        logits[1, : V // 2] = float("-inf")  # whole chunks masked out
        logits[1, V // 2 + 1] = logits[1].max() + 2
    return logits


# Every case chunks (fewer rows than PICK_PARALLELISM); the one-stage path is the reference.
@pytest.mark.parametrize("B,V", [(1, 128256), (1, 100003), (2, 130), (3, 1000), (1, 7), (32, 500), (16, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_pick_matches_one_stage(B, V, dtype):
    logits = awkward_logits(B, V, dtype)
    tokens, logprobs = sampling.greedy_and_logprobs(logits)
    want_tokens, want_logprobs = one_stage(logits)
    assert torch.equal(tokens, want_tokens)
    assert logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs, want_logprobs, rtol=0, atol=1e-5)
    assert tokens[0] == 5


def test_chunked_pick_compiled_matches_one_stage():
    logits = awkward_logits(2, 32000, torch.bfloat16)
    tokens, logprobs = torch.compile(sampling.greedy_and_logprobs, dynamic=False)(logits)
    want_tokens, want_logprobs = one_stage(logits)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logprobs, want_logprobs, rtol=0, atol=1e-5)


def test_pick_is_chunked_only_with_few_rows(monkeypatch):
    calls = []
    monkeypatch.setattr(sampling, "greedy_next", lambda logits: calls.append(logits.shape) or logits.argmax(-1))
    sampling.greedy_and_logprobs(torch.randn(sampling.PICK_PARALLELISM, 50))
    assert calls == [(sampling.PICK_PARALLELISM, 50)]  # one stage
    sampling.greedy_and_logprobs(torch.randn(1, 50))
    assert len(calls) == 1  # chunked: the one-stage function is not called
