"""ft's Triton kernel for a loss chunk (`ft.training.cross_entropy_kernel`): each row's
cross-entropy and the softmax gradient written over the logits, against torch's math,
through Triton's CPU interpreter (in a subprocess) and, where there is one, on the GPU."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from ft.training import loss as loss_module

# rows, vocabulary, tile: tiles shorter than a row (a ragged last tile) and longer than it,
# fewer rows than programs and more.
CASES = [(3, 1000, 256), (9, 1500, 512), (5, 300, 1024), (2, 4096, 4096)]


def _reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.float()
    loss = F.cross_entropy(logits, labels, reduction="none")
    return loss, torch.softmax(logits, -1) - F.one_hot(labels, logits.shape[1]).float()


_INTERPRETED = """
import torch
from ft.training import cross_entropy_kernel as kernel, loss as loss_module
from ft.triton_support import triton_usable
from test_cross_entropy_kernel import CASES, _reference
assert triton_usable(torch.device("cpu"))
g = torch.Generator().manual_seed(0)
# bfloat16 is not what Triton's interpreter reads correctly; float16 stands in for it.
for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
    for rows, vocab, block in CASES:
        logits = (4 * torch.randn(rows, vocab, generator=g)).to(dtype)
        labels = torch.randint(0, vocab, (rows,), generator=g)
        want_loss, want_grad = _reference(logits, labels)
        loss = kernel.softmax_gradient_(logits, labels, block=block)
        assert loss.dtype == torch.float32 and logits.dtype == dtype
        torch.testing.assert_close(loss, want_loss, atol=tol, rtol=tol)
        torch.testing.assert_close(logits.float(), want_grad, atol=tol, rtol=tol)

# The fused loss through the kernel (chosen, it is the chunk math wherever Triton runs), against full logits.
loss_module.chunk_kernel = "triton"
assert loss_module._chunk_fn(torch.device("cpu")) is loss_module._kernel_chunk_loss_and_grads
head = torch.nn.Linear(16, 300, bias=False)
hidden = torch.randn(2, 9, 16, requires_grad=True, generator=g)
labels = torch.randint(0, 300, (2, 9), generator=g)
labels[0, :4] = -100
fused = loss_module.chunked_cross_entropy_sum(hidden, head, labels, chunk_size=4)
fused.backward()
got = fused.detach(), hidden.grad.clone(), head.weight.grad.clone()
hidden.grad, head.weight.grad = None, None
loss_module.cross_entropy_sum(head(hidden), labels).backward()
torch.testing.assert_close(got[0], loss_module.cross_entropy_sum(head(hidden), labels).detach())
torch.testing.assert_close(got[1], hidden.grad, atol=1e-5, rtol=1e-5)
torch.testing.assert_close(got[2], head.weight.grad, atol=1e-5, rtol=1e-5)
assert (got[1][0, :4] == 0).all()  # positions without a label get no gradient
print("ok", len(CASES))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernel is tested instead")
def test_kernel_interpreted_on_the_cpu_matches_torch():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_INTERPRETED)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"ok {len(CASES)}"


def test_off_triton_the_chunk_math_is_eager_and_a_bad_choice_is_named(monkeypatch):
    assert loss_module.chunk_kernel == "compiled"  # the kernel is opt-in
    assert loss_module._chunk_fn(torch.device("cpu")) is loss_module._chunk_loss_and_grads
    if os.environ.get("TRITON_INTERPRET") != "1":
        monkeypatch.setattr(loss_module, "chunk_kernel", "triton")
        assert loss_module._chunk_fn(torch.device("cpu")) is loss_module._chunk_loss_and_grads
    monkeypatch.setattr(loss_module, "chunk_kernel", "liger")
    with pytest.raises(ValueError, match="chunk_kernel must be one of"):
        loss_module._chunk_fn(torch.device("cpu"))


def test_logits_with_strided_rows_are_refused():
    from ft.training.cross_entropy_kernel import softmax_gradient_

    with pytest.raises(ValueError, match="contiguous rows"):
        softmax_gradient_(torch.zeros(8, 4).t(), torch.zeros(4, dtype=torch.int64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel needs a GPU")
@pytest.mark.parametrize("rows, vocab", [(1024, 128256), (37, 32000), (300, 1000)])
def test_cuda_kernel_matches_the_compiled_expression(rows, vocab):
    from ft.training.cross_entropy_kernel import softmax_gradient_

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (4 * torch.randn(rows, vocab, generator=g, device="cuda")).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (rows,), generator=g, device="cuda")
    want_loss, want_grad = _reference(logits, labels)
    loss = softmax_gradient_(logits, labels)
    torch.testing.assert_close(loss, want_loss, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(logits.float(), want_grad, atol=1e-4, rtol=1.6e-2)

    # Both chunk paths of the fused loss give the same loss and gradients in bf16.
    weight = torch.randn(vocab, 64, generator=g, device="cuda").to(torch.bfloat16)
    hidden = torch.randn(rows, 64, generator=g, device="cuda").to(torch.bfloat16)
    by_kernel = loss_module._kernel_chunk_loss_and_grads(hidden, weight, labels)
    by_inductor = torch.compile(loss_module._chunk_loss_and_grads, dynamic=True)(hidden, weight, labels)
    torch.testing.assert_close(by_kernel[0], by_inductor[0], rtol=1e-5, atol=1e-2)
    for a, b in zip(by_kernel[1:], by_inductor[1:]):
        torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-4)
