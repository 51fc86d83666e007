"""The loss the trainer optimises: chunked CE, packed rows, gradient accumulation."""

import contextlib

import pytest
import torch

from ft.data.formats import Example
from ft.data.packing import collate
from ft.models import build_model
from ft.models.llama.model import LlamaConfig
from ft.training.step import accumulate_gradients, next_token_loss
from ft.training.step_stats import StepStats
from ft.training.loss import chunked_cross_entropy_sum, cross_entropy_sum

CONFIG = LlamaConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


class OneProcess:
    """The gangs of a single process, as the trainer sees them."""

    class _Gang:
        rank, size = 0, 1

        def all_reduce(self, tensor, op="sum"):
            pass

    def __init__(self):
        self.root = self.dp = self.tp = self._Gang()
        self.device = torch.device("cpu")


def model(seed=0):
    return build_model(CONFIG, device="cpu", seed=seed)


def example(seed: int, prompt: int, response: int) -> Example:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, CONFIG.vocab_size, (prompt + response,), generator=g).tolist()
    return Example(tokens, [False] * prompt + [True] * response)


def grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_chunked_cross_entropy_matches_full_logits(chunk_size):
    m = model()
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 12))
    labels = torch.randint(0, CONFIG.vocab_size, (2, 12))
    labels[0, :4] = -100
    hidden = m(tokens, return_hidden=True)
    chunked = chunked_cross_entropy_sum(hidden, m.lm_head, labels, chunk_size=chunk_size)
    chunked.backward()
    g_chunked = grads(m)
    m.zero_grad()
    full = cross_entropy_sum(m(tokens), labels)
    full.backward()
    torch.testing.assert_close(chunked, full)
    for name, g in grads(m).items():
        torch.testing.assert_close(g_chunked[name], g, msg=name)


def test_packed_row_equals_each_document_alone():
    examples = [example(1, 5, 7), example(2, 3, 9), example(3, 6, 4)]
    m = model()
    packed = collate(examples, [[0, 1, 2]], seq_len=48, num_rows=1, pad_id=0)
    hidden = m(packed.tokens_BT, positions_BT=packed.positions_BT, document_ids_BT=packed.document_ids_BT,
               return_hidden=True)
    per_token = torch.nn.functional.cross_entropy(
        m.lm_head(hidden)[0], packed.labels_BT[0].clamp(min=0), reduction="none"
    ) * (packed.labels_BT[0] != -100)
    packed_loss = chunked_cross_entropy_sum(hidden, m.lm_head, packed.labels_BT)
    packed_loss.backward()
    g_packed = grads(m)

    m.zero_grad()
    total = 0.0
    for i, doc in enumerate(packed.document_ids_BT[0].unique()):
        if doc < 0:
            continue
        alone = collate(examples, [[int(doc)]], seq_len=len(examples[int(doc)].tokens), num_rows=1, pad_id=0)
        loss = chunked_cross_entropy_sum(m(alone.tokens_BT, return_hidden=True), m.lm_head, alone.labels_BT)
        in_packed = per_token[packed.document_ids_BT[0] == doc].sum()
        torch.testing.assert_close(in_packed, loss.detach(), rtol=1e-5, atol=1e-5)
        total = total + loss
    total.backward()
    torch.testing.assert_close(packed_loss.detach(), total.detach(), rtol=1e-5, atol=1e-5)
    for name, g in grads(m).items():
        torch.testing.assert_close(g_packed[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_two_accumulation_steps_equal_one_big_step():
    examples = [example(i, 4 + i % 3, 6 + i % 5) for i in range(4)]
    rows = [[0, 1], [2], [3]]
    whole = collate(examples, rows, seq_len=24, num_rows=3, pad_id=0)
    first = collate(examples, rows[:1], seq_len=24, num_rows=1, pad_id=0)
    second = collate(examples, rows[1:], seq_len=24, num_rows=2, pad_id=0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gangs = OneProcess()

    def update(batches):
        m = model()
        # SGD: the update is the gradient itself (Adam would amplify float noise on ~0 gradients).
        opt = torch.optim.SGD(m.parameters(), lr=1e-1)
        stats = StepStats.zero(torch.device("cpu"))
        accumulate_gradients(m, batches, gangs=gangs, autocast=contextlib.nullcontext(), scaler=scaler,
                             loss_fn=next_token_loss(7), stats=stats)
        g = grads(m)
        opt.step()
        return g, m.state_dict(), stats

    g_one, w_one, s_one = update([whole])
    g_two, w_two, s_two = update([first, second])
    assert s_one.targets == s_two.targets > 0
    torch.testing.assert_close(s_one.loss_sum, s_two.loss_sum)
    for name in g_one:
        torch.testing.assert_close(g_one[name], g_two[name], rtol=1e-5, atol=1e-7, msg=name)
    for name in w_one:
        torch.testing.assert_close(w_one[name], w_two[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fused_loss_under_bf16_autocast_matches_float32():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[1, 3:] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = chunked_cross_entropy_sum(hidden, head, labels, chunk_size=4)
    fused.backward()
    g_hidden, g_weight = hidden.grad.clone(), head.weight.grad.clone()
    assert head.weight.grad.dtype == torch.float32
    hidden.grad, head.weight.grad = None, None
    reference = cross_entropy_sum(head(hidden), labels)
    reference.backward()
    torch.testing.assert_close(fused, reference, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(g_hidden, hidden.grad, rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(g_weight, head.weight.grad, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("frozen_head", [False, True])
def test_fused_loss_gradients_under_a_scaled_loss_and_a_frozen_head(frozen_head):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    head.weight.requires_grad_(not frozen_head)
    hidden = torch.randn(2, 12, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 12))
    labels[0, :3] = -100
    (3.0 * chunked_cross_entropy_sum(hidden, head, labels, chunk_size=5)).backward()
    got_hidden = hidden.grad.clone()
    got_weight = None if head.weight.grad is None else head.weight.grad.clone()
    hidden.grad = None
    reference = 3.0 * cross_entropy_sum(head(hidden), labels)
    reference.backward()
    torch.testing.assert_close(got_hidden, hidden.grad, rtol=1e-5, atol=1e-6)
    if frozen_head:
        assert got_weight is None
    else:
        want = torch.autograd.grad(3.0 * cross_entropy_sum(head(hidden.detach()), labels), head.weight)[0]
        torch.testing.assert_close(got_weight, want, rtol=1e-5, atol=1e-6)


def test_compiled_chunk_math_matches_eager():
    """The chunk function as GPUs run it (compiled, dynamic lengths), here compiled for
    the CPU: the same loss and gradients as eager, in bf16, on chunks of two lengths."""
    from ft.training.loss import _chunk_loss_and_grads

    compiled = torch.compile(_chunk_loss_and_grads, dynamic=True)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 32, generator=g).to(torch.bfloat16)
    for rows in (64, 37):
        hidden = torch.randn(rows, 32, generator=g).to(torch.bfloat16)
        labels = torch.randint(0, 1000, (rows,), generator=g)
        got, want = compiled(hidden, weight, labels), _chunk_loss_and_grads(hidden, weight, labels)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-3)
        for a, b in zip(got[1:], want[1:]):
            assert a.dtype == torch.bfloat16
            torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-5)
        # softmax - one_hot: each row of the logits' gradient sums to zero, -1 + p at the label.
        assert got[2].float().sum(1).abs().max() < 2e-2
        assert (got[2].float().gather(1, labels[:, None]) < 0).all()
