"""KV-cache decoding gives the logits of a full forward at every position, with
left-padded batches, for the generator's StaticKVCache (including reuse across batches, in-place reorder, and the CUDA graph step)."""

from __future__ import annotations

import pytest
import torch
from generation_helpers import random_prompts, tiny_model

from ft.generation import DecodeStep, StaticKVCache

LENGTHS = [5, 9, 3]
NEW = 6


def full_forward_logits(model, sequence: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([sequence]))[0]  # [T, V]


def decode_with_cache(model, cache, prompts, continuations) -> list[torch.Tensor]:
    """Prefill left-padded prompts, feed `continuations` one token per step.
    Returns per row the logits [len(prompt) + NEW, V] at its real positions."""
    B, T0 = len(prompts), max(len(p) for p in prompts)
    tokens_BT = torch.tensor([[0] * (T0 - len(p)) + p for p in prompts])
    mask_BT = torch.tensor([[False] * (T0 - len(p)) + [True] * len(p) for p in prompts])
    cache.reset(mask_BT)
    positions_BT = (mask_BT.long().cumsum(-1) - 1).clamp(min=0)
    collected = []
    with torch.no_grad():
        logits_BTV = model(tokens_BT, positions_BT=positions_BT, kv_cache=cache)
        collected.append(logits_BTV)
        pos_B1 = positions_BT[:, -1:] + 1
        for t in range(NEW):
            next_B1 = torch.tensor([[c[t]] for c in continuations])
            collected.append(model(next_B1, positions_BT=pos_B1, kv_cache=cache))
            pos_B1 = pos_B1 + 1
    all_BTV = torch.cat(collected, dim=1)
    return [all_BTV[b, T0 - len(p) :] for b, p in enumerate(prompts)]


def test_cached_decoding_matches_full_forward():
    model = tiny_model()
    prompts = random_prompts(LENGTHS)
    continuations = random_prompts([NEW] * len(LENGTHS), seed=7)
    max_len = max(LENGTHS) + NEW
    cache = StaticKVCache(model, batch_size=len(prompts), max_len=max_len)
    got = decode_with_cache(model, cache, prompts, continuations)
    for b, (p, c) in enumerate(zip(prompts, continuations)):
        expected = full_forward_logits(model, p + c)
        torch.testing.assert_close(got[b], expected, atol=1e-5, rtol=1e-5)


def test_static_cache_reuse_after_reset_and_reorder():
    model = tiny_model(seed=3)
    cache = StaticKVCache(model, batch_size=3, max_len=max(LENGTHS) + NEW + 4)
    # A first batch leaves stale keys in every slot...
    decode_with_cache(model, cache, random_prompts([12, 2, 7], seed=5), random_prompts([NEW] * 3, seed=6))
    # ...which a reset batch never sees.
    prompts, continuations = random_prompts(LENGTHS), random_prompts([NEW] * 3, seed=7)
    got = decode_with_cache(model, cache, prompts, continuations)
    for b, (p, c) in enumerate(zip(prompts, continuations)):
        torch.testing.assert_close(got[b], full_forward_logits(model, p + c), atol=1e-5, rtol=1e-5)

    # Reorder (beam search): rows [2, 2, 0] continue as the sequences they now hold.
    order = [2, 2, 0]
    cache.reorder(torch.tensor(order))
    pos_B1 = torch.tensor([[len(prompts[i]) + NEW] for i in order])
    extra = [11, 12, 13]
    with torch.no_grad():
        logits_BV = model(torch.tensor(extra)[:, None], positions_BT=pos_B1, kv_cache=cache)[:, -1]
    for row, i in enumerate(order):
        expected = full_forward_logits(model, prompts[i] + continuations[i] + [extra[row]])[-1]
        torch.testing.assert_close(logits_BV[row], expected, atol=1e-5, rtol=1e-5)


def test_static_cache_rejects_a_batch_that_does_not_fit():
    model = tiny_model()
    cache = StaticKVCache(model, batch_size=2, max_len=8)
    with pytest.raises(ValueError, match="does not fit"):
        cache.reset(torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="keeps 2 rows"):
        cache.reorder(torch.tensor([0, 1, 1]))


def _step_logits(model, *, cuda_graph: bool, compile: bool, device: str) -> tuple[list[torch.Tensor], str]:
    prompts = random_prompts(LENGTHS)
    cache = StaticKVCache(model, batch_size=len(prompts), max_len=max(LENGTHS) + NEW)
    T0 = max(LENGTHS)
    mask_BT = torch.tensor([[False] * (T0 - len(p)) + [True] * len(p) for p in prompts], device=device)
    tokens_BT = torch.tensor([[0] * (T0 - len(p)) + p for p in prompts], device=device)
    cache.reset(mask_BT)
    positions_BT = (mask_BT.long().cumsum(-1) - 1).clamp(min=0)
    step = DecodeStep(model, cache, cuda_graph=cuda_graph, compile=compile)
    out = []
    with torch.inference_mode():
        model(tokens_BT, positions_BT=positions_BT, kv_cache=cache)
        pos_B1 = positions_BT[:, -1:] + 1
        for t in range(NEW):
            out.append(step(torch.full((len(prompts), 1), 5 + t, device=device), pos_B1).clone())
            pos_B1 = pos_B1 + 1
    return out, step.path


def test_eager_decode_step_matches_model_call():
    model = tiny_model()
    got, path = _step_logits(model, cuda_graph=True, compile=False, device="cpu")  # no graphs on CPU
    assert path == "eager"
    prompts = random_prompts(LENGTHS)
    for b, p in enumerate(prompts):
        expected = full_forward_logits(model, p + [5 + t for t in range(NEW)])[len(p) :]
        torch.testing.assert_close(torch.stack([g[b] for g in got]), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_step_matches_eager():
    model = tiny_model().cuda()
    eager, _ = _step_logits(model, cuda_graph=False, compile=False, device="cuda")
    graphed, path = _step_logits(model, cuda_graph=True, compile=False, device="cuda")
    assert path == "eager+cuda_graph"
    for e, g in zip(eager, graphed):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
