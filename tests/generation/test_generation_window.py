"""The decode step attends over the cache's filled slots rounded up to a bucket
(`StaticKVCache.window_for`), and that gives the logits of attending over the whole
cache and of a full forward."""

from __future__ import annotations

import torch
from generation_helpers import random_prompts, tiny_model

from ft.generation import DecodeStep, StaticKVCache
from ft.generation.cache import MAX_BUCKETS


def test_windows_are_aligned_buckets_up_to_max_len():
    model = tiny_model()
    cache = StaticKVCache(model, batch_size=1, max_len=384)
    windows = [cache.window_for(n) for n in range(1, 385)]
    assert windows[128] == 144 and windows[-1] == 384  # 129 filled slots -> the 48-slot bucket above
    assert all(w >= n and w % 16 == 0 for n, w in enumerate(windows, start=1))
    assert len(set(windows)) <= MAX_BUCKETS
    assert StaticKVCache(model, batch_size=1, max_len=21).window_for(20) == 21  # never past the cache
    assert StaticKVCache(model, batch_size=1, max_len=4096).window_for(1) == 512


def test_windowed_decode_matches_full_forward():
    model = tiny_model(seed=4)
    prompts = random_prompts([9, 4, 7])
    new = 30
    cache = StaticKVCache(model, batch_size=3, max_len=128)  # buckets of 16: windows 16, 32, 48
    T0 = max(len(p) for p in prompts)
    mask_BT = torch.tensor([[False] * (T0 - len(p)) + [True] * len(p) for p in prompts])
    tokens_BT = torch.tensor([[0] * (T0 - len(p)) + p for p in prompts])
    cache.reset(mask_BT)
    positions_BT = (mask_BT.long().cumsum(-1) - 1).clamp(min=0)
    step = DecodeStep(model, cache, cuda_graph=False, compile=False)
    continuation = [(7 * t) % 90 + 3 for t in range(new)]
    windows, logits = [], []
    with torch.inference_mode():
        model(tokens_BT, positions_BT=positions_BT, kv_cache=cache)
        assert cache.window_len == 128  # prefill spans the whole cache
        pos_B1 = positions_BT[:, -1:] + 1
        for t in range(new):
            logits.append(step(torch.full((3, 1), continuation[t]), pos_B1).clone())
            windows.append(cache.window_len)
            pos_B1 = pos_B1 + 1
    assert windows[0] == 16 and windows[-1] == 48 and windows == sorted(windows)
    for b, p in enumerate(prompts):
        with torch.no_grad():
            expected_TV = model(torch.tensor([p + continuation]))[0, len(p):]
        torch.testing.assert_close(torch.stack([l[b] for l in logits]), expected_TV, atol=1e-5, rtol=1e-5)
