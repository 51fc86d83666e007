"""`split_kv_decode_attention` against SDPA: the Triton kernels (on CUDA, or on the CPU
through Triton's interpreter in a subprocess) and the SDPA path off the GPU, over split
and single-pass launches, grouped-query heads, head sizes that are not a power of two,
strided cache views, and masks that hide whole splits."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from ft.models.attention_mask import DecodeKeyMask
from ft.models.decode_attention import BLOCK_KEYS, num_splits_for, split_kv_decode_attention

# (rows, KV heads, query heads per KV head, window, head size, programs wanted):
# wanted programs decide the splits; 80 is no power of two; 200 keys hide their first 128.
CASES = [(2, 2, 4, 100, 64, 8), (3, 1, 3, 520, 32, 64), (1, 2, 2, 400, 64, 8), (2, 2, 1, 40, 80, 1), (4, 8, 4, 192, 64, 512)]


def _inputs(B, K, G, S, H, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, K * G, 1, H, generator=gen).to(device, dtype)
    # Views of longer buffers, as the cache hands them: the window is a prefix of the slots.
    k = torch.randn(B, K, S + 16, H, generator=gen).to(device, dtype).narrow(2, 0, S)
    v = torch.randn(B, K, S + 16, H, generator=gen).to(device, dtype).narrow(2, 0, S)
    allowed = torch.rand(B, S, generator=gen) > 0.3
    allowed[:, -1] = True  # the new token's own slot
    if S > 128:
        allowed[:, :128] = False  # a split with nothing to attend to
    return q, k, v, allowed.to(device)


def _sdpa(q, k, v, allowed):
    G = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(G, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=allowed[:, None, None, :])


def test_splits_cover_the_keys_in_whole_tiles():
    for rows, keys, wanted in [(512, 300, 264), (8, 300, 264), (8, 64, 264), (1, 1, 1), (3, 1000, 100)]:
        splits, per_split = num_splits_for(rows, keys, wanted)
        assert per_split % BLOCK_KEYS == 0
        assert (splits - 1) * per_split < keys <= splits * per_split
    assert num_splits_for(512, 300, 264)[0] == 1  # enough programs without splitting
    assert num_splits_for(8, 300, 264) == (3, 128)  # splits of at least MIN_KEYS_PER_SPLIT keys
    assert num_splits_for(8, 256, 264)[0] == 1  # two splits and a combine: one direct pass instead
    assert num_splits_for(8, 4096, 264) == (32, 128)  # up to the programs wanted
    assert 250 < num_splits_for(1, 100_000, 264)[0] <= 264  # whole tiles per split: about the programs wanted


def test_off_the_gpu_the_op_is_sdpa():
    q, k, v, allowed = _inputs(2, 2, 4, 100, 64, torch.float32)
    out = split_kv_decode_attention(q, k, v, DecodeKeyMask(allowed))
    torch.testing.assert_close(out, _sdpa(q, k, v, allowed), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one query token"):
        split_kv_decode_attention(q.expand(2, 8, 2, 64), k, v, DecodeKeyMask(allowed))


_INTERPRETED = """
import torch
import ft.models.decode_attention as da
from ft.models.attention_mask import DecodeKeyMask
from test_decode_attention import CASES, _inputs, _sdpa
assert da.triton_usable(torch.device("cpu"))
for B, K, G, S, H, wanted in CASES:
    da._programs_wanted = lambda index, wanted=wanted: wanted
    # bfloat16 is not what Triton's interpreter reads correctly; float16 stands in for it.
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        q, k, v, allowed = _inputs(B, K, G, S, H, dtype)
        out = da.split_kv_decode_attention(q, k, v, DecodeKeyMask(allowed))
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out.float(), _sdpa(q, k, v, allowed), atol=tol, rtol=tol)
print("ok", len(CASES))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
# Where there is a GPU the compiled kernels are tested (below); the interpreter of the Triton
# that ships with torch 2.11 fails on these kernels' scalar arithmetic, the one of Triton 3.9 runs them.
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernels are tested instead")
def test_triton_kernels_interpreted_on_the_cpu_match_sdpa():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_INTERPRETED)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"ok {len(CASES)}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need a GPU (or the interpreter)")
@pytest.mark.parametrize("case", CASES)
def test_cuda_triton_kernels_match_sdpa(case):
    import ft.models.decode_attention as da

    B, K, G, S, H, _ = case
    q, k, v, allowed = _inputs(B, K, G, S, H, torch.bfloat16, device="cuda")
    out = da.split_kv_decode_attention(q, k, v, DecodeKeyMask(allowed))
    torch.testing.assert_close(out.float(), _sdpa(q, k, v, allowed), atol=2e-2, rtol=2e-2)
    # Under torch.compile the op stays one opaque call and gives the same result.
    compiled = torch.compile(lambda *a: da.split_kv_decode_attention(*a[:3], DecodeKeyMask(a[3])), dynamic=False)
    torch.testing.assert_close(compiled(q, k, v, allowed), out, atol=0, rtol=0)
