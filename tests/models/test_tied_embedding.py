"""A tied embedding's gradient added into the fused loss's head gradient in place
(`ft.models.tied_embedding`): the same gradients as autograd's own path, over
micro-batches and under autocast, and torch's path wherever the pairing does not hold."""

import contextlib

import pytest
import torch

from ft.data.formats import Example
from ft.data.packing import collate
from ft.models import build_model, find_arch
from ft.models import tied_embedding
from ft.training.loss import chunked_cross_entropy_sum, cross_entropy_sum
from ft.training.step import accumulate_gradients, next_token_loss
from ft.training.step_stats import StepStats
from tests.training.test_loss_and_accumulation import OneProcess

TIED = find_arch("llama_debug_tied")[1]
UNTIED = find_arch("llama_debug")[1]


def batches(config, count):
    g = torch.Generator().manual_seed(1)
    examples = [Example(torch.randint(3, config.vocab_size, (5 + i + 7,), generator=g).tolist(),
                        [False] * (5 + i) + [True] * 7) for i in range(2 * count)]
    return [collate(examples[2 * i:2 * i + 2], [[0], [1]], seq_len=16, num_rows=2, pad_id=0)
            for i in range(count)]


def gradients(model, loss_fn, batch_list, autocast=contextlib.nullcontext()):
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, batch_list, gangs=OneProcess(), autocast=autocast,
                         scaler=torch.amp.GradScaler("cpu", enabled=False), loss_fn=loss_fn,
                         stats=StepStats.zero(torch.device("cpu")))
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def autograd_loss(loss_chunk_size):
    """The same loss without the pairing: torch's embedding gradient, summed by autograd."""

    def loss_fn(model, batch, device):
        hidden = model(batch.tokens_BT, positions_BT=batch.positions_BT, document_ids_BT=batch.document_ids_BT,
                       return_hidden=True)
        return chunked_cross_entropy_sum(hidden, model.lm_head, batch.labels_BT, chunk_size=loss_chunk_size)

    return loss_fn


@pytest.fixture
def handed_over(monkeypatch):
    results = []
    real = tied_embedding.hand_over

    def spy(weight, gradient):
        results.append(real(weight, gradient))
        return results[-1]

    monkeypatch.setattr(tied_embedding, "hand_over", spy)
    return results


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_tied_gradient_equals_autograds_sum(micro_batches, handed_over):
    model = build_model(TIED, device="cpu", seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    data = batches(TIED, micro_batches)
    want = gradients(model, autograd_loss(5), data)
    assert handed_over == [False] * micro_batches  # no pairing outside next_token_loss
    handed_over.clear()
    got = gradients(model, next_token_loss(5), data)
    assert handed_over == [True] * micro_batches
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_tied_gradient_under_bf16_autocast_with_float32_weights(handed_over):
    model = build_model(TIED, device="cpu", seed=0)
    data = batches(TIED, 2)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    want = gradients(model, autograd_loss(8), data, autocast)
    handed_over.clear()
    got = gradients(model, next_token_loss(8), data, autocast)
    assert handed_over == [True, True]
    assert model.lm_head.weight.grad.dtype == torch.float32
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-2, atol=1e-4, msg=name)


def test_bf16_weights_get_the_embedding_rows_added_in_bf16(handed_over):
    model = build_model(TIED, device="cpu", seed=0).to(torch.bfloat16)
    data = batches(TIED, 1)
    want = gradients(model, autograd_loss(8), data)
    handed_over.clear()
    got = gradients(model, next_token_loss(8), data)
    assert handed_over == [True] and got["model.embed_tokens.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(got["model.embed_tokens.weight"], want["model.embed_tokens.weight"], rtol=2e-2, atol=1e-3)


def test_an_untied_head_is_not_linked(handed_over):
    model = build_model(UNTIED, device="cpu", seed=0)
    data = batches(UNTIED, 1)
    want = gradients(model, autograd_loss(5), data)
    handed_over.clear()
    got = gradients(model, next_token_loss(5), data)
    assert handed_over == [False]
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_loss_that_does_not_hand_over_gets_torchs_gradient(monkeypatch):
    """Inside the pairing, a loss from full logits: the lookup's backward makes the dense gradient."""
    lookups = []
    real = tied_embedding.embedding
    monkeypatch.setattr(tied_embedding, "embedding", lambda *a: lookups.append(real(*a)) or lookups[-1])
    model = build_model(TIED, device="cpu", seed=0)
    tokens = torch.randint(0, TIED.vocab_size, (2, 12))
    labels = torch.randint(0, TIED.vocab_size, (2, 12))
    with tied_embedding.tied_gradient(model.lm_head.weight):
        linked = cross_entropy_sum(model(tokens), labels)
    assert type(lookups[-1].grad_fn).__name__ == "_LinkedEmbeddingBackward"
    linked.backward()
    got = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    cross_entropy_sum(model(tokens), labels).backward()
    assert type(lookups[-1].grad_fn).__name__ == "EmbeddingBackward0"
    torch.testing.assert_close(got, model.lm_head.weight.grad, rtol=1e-5, atol=1e-6)


def test_no_grad_and_a_second_lookup_take_torchs_path():
    model = build_model(TIED, device="cpu", seed=0)
    tokens = torch.randint(0, TIED.vocab_size, (1, 4))
    embed = model.model.embed_tokens
    with tied_embedding.tied_gradient(model.lm_head.weight):
        with torch.no_grad():
            assert tied_embedding.embedding(embed, tokens).grad_fn is None
        first = tied_embedding.embedding(embed, tokens)
        second = tied_embedding.embedding(embed, tokens)
    assert type(first.grad_fn).__name__ == "_LinkedEmbeddingBackward"
    assert type(second.grad_fn).__name__ == "EmbeddingBackward0"



@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's accumulating index_put_ is what is checked")
def test_cuda_tied_gradient_is_deterministic_and_equals_autograds():
    config = find_arch("llama_debug_tied")[1]
    model = build_model(config, device="cuda", seed=0).to(torch.bfloat16)
    # Many repeats of few tokens: the accumulation's duplicates are what could reorder.
    tokens = torch.randint(0, 8, (4, 64), device="cuda")
    labels = torch.randint(0, config.vocab_size, (4, 64), device="cuda")

    def head_gradient(paired):
        model.zero_grad(set_to_none=True)
        with tied_embedding.tied_gradient(model.lm_head.weight) if paired else contextlib.nullcontext():
            hidden = model(tokens, return_hidden=True)
            chunked_cross_entropy_sum(hidden, model.lm_head, labels, chunk_size=64).backward()
        return model.lm_head.weight.grad.clone()

    first, second, want = head_gradient(True), head_gradient(True), head_gradient(False)
    assert torch.equal(first, second)
    torch.testing.assert_close(first.float(), want.float(), rtol=2e-2, atol=2e-3)
