"""Each criterion's loss and gradients equal the paper's formula written here on
full logits (float32), and packed batches equal unpacked ones."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ft.models import create_model, resolve_model
from ft.preference.criteria import CriterionConfig, CpoConfig, DpoConfig, OrpoConfig, SimpoConfig
from ft.preference.data import PairPlanner, PreferencePair
from ft.preference.logprobs import batch_sequence_logprobs, sequence_logprobs
from ft.preference.step import preference_loss
from ft.training.loss import target_positions

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    source = resolve_model("ft_tiny")
    torch.manual_seed(0)
    return create_model(source.config, device=CPU, dtype=torch.float32, checkpoint=source.checkpoint)


def make_pairs(n: int = 5, seed: int = 0) -> list[PreferencePair]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(3, 1000, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [PreferencePair([1] + ids(2, 6), ids(1, 7) + [2], ids(1, 7) + [2]) for _ in range(n)]


def direct_logprobs(model, pair: PreferencePair) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y|x) of chosen and rejected, each sequence alone through the full logits."""
    out = []
    for response in (pair.chosen, pair.rejected):
        tokens = torch.tensor([pair.prompt + response])
        logits = model(tokens)[0].float()  # [T, V]: the full logits
        logp = torch.log_softmax(logits, dim=-1)
        p = len(pair.prompt)
        out.append(sum(logp[p - 1 + j, tok] for j, tok in enumerate(response)))
    return out[0], out[1]


def paper_loss(name: str, section, c, r, lc, lr, c0, r0) -> torch.Tensor:
    """One pair's loss as the papers write it."""
    if name == "dpo":
        z = section.beta * ((c - c0) - (r - r0))
        eps = section.label_smoothing
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z) + section.nll_scale * (-c / lc)
    if name == "simpo":
        return -F.logsigmoid(section.beta / lc * c - section.beta / lr * r - section.gamma)
    if name == "orpo":
        pc, pr = torch.exp(c / lc), torch.exp(r / lr)
        log_odds_ratio = torch.log((pc / (1 - pc)) / (pr / (1 - pr)))
        return section.nll_scale * (-c / lc) - section.orpo_lambda * F.logsigmoid(log_odds_ratio)
    if name == "cpo":
        return -F.logsigmoid(section.beta * c - section.beta * r) + section.nll_scale * (-c / lc)
    raise AssertionError(name)


CASES = [
    ("dpo", DpoConfig(beta=0.3)),
    ("dpo", DpoConfig(beta=0.2, label_smoothing=0.1, nll_scale=0.5)),
    ("simpo", SimpoConfig(beta=2.0, gamma=0.7)),
    ("orpo", OrpoConfig(orpo_lambda=0.4, nll_scale=1.0)),
    ("cpo", CpoConfig(beta=0.5, nll_scale=0.8)),
]


@pytest.mark.parametrize("name, section", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_loss_and_gradients_equal_the_papers_formula(model, name, section, one_thread):
    pairs = make_pairs()
    reference = torch.randn(len(pairs), 2) * 3 - 20
    criterion = CriterionConfig(name=name, **{name: section})
    planner = PairPlanner(pairs, max_seq_len=32, max_num_tokens=128, packing=True, pad_id=0)
    (plan,) = planner.plan(range(len(pairs)))
    batch = planner.collate(plan)
    loss_fn = preference_loss(criterion, chunk_size=5, reference_P2=reference if name == "dpo" else None)

    model.zero_grad()
    loss_sum, _ = loss_fn(model, batch, CPU)
    (loss_sum / len(pairs)).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    losses = []
    for k, i in enumerate(batch.pair_index_P.tolist()):
        c, r = direct_logprobs(model, pairs[i])
        lc, lr = float(len(pairs[i].chosen)), float(len(pairs[i].rejected))
        losses.append(paper_loss(name, section, c, r, lc, lr, reference[i, 0], reference[i, 1]))
    want = torch.stack(losses).mean()
    want.backward()
    assert (loss_sum / len(pairs)).item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_packed_equals_unpacked(model, one_thread):
    pairs = make_pairs(9, seed=3)
    criterion = CriterionConfig(name="simpo")
    loss_fn = preference_loss(criterion, chunk_size=7, reference_P2=None)
    results = {}
    for packing in (True, False):
        planner = PairPlanner(pairs, max_seq_len=16, max_num_tokens=64 if packing else 4096, packing=packing,
                              pad_id=0)
        logps = torch.zeros(len(pairs), 2)
        total = 0.0
        plans = planner.plan(range(len(pairs)))
        for plan in plans:
            batch = planner.collate(plan)
            logp_S, counts_S = batch_sequence_logprobs(model, batch, CPU, chunk_size=7)
            logps[batch.pair_index_P] = logp_S.view(-1, 2).detach()
            total += float(loss_fn(model, batch, CPU)[0].detach())
        results[packing] = (logps, total, len(plans))
    assert results[True][2] > 1 and results[False][2] == 1  # several packed micro-batches, one unpacked
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    assert results[True][1] == pytest.approx(results[False][1], rel=1e-5)
    packed = PairPlanner(pairs, max_seq_len=16, max_num_tokens=64, packing=True, pad_id=0)
    batch = packed.collate(packed.plan(range(len(pairs)))[0])
    assert (batch.document_ids_BT.max(dim=1).values > 0).any()  # rows really hold several sequences


def test_module_head_path_equals_linear_path(model, one_thread):
    """A head that is not a plain Linear (as under tensor parallelism) takes the checkpointed path."""
    torch.manual_seed(1)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    head = nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100
    index = target_positions(labels)
    sequences = (torch.arange(18) // 5).index_select(0, index)
    grads = []
    for output in (head, nn.Sequential(head)):
        hidden.grad, head.weight.grad = None, None
        logp = sequence_logprobs(hidden, output, labels, sequences, 4, chunk_size=4, target_index_N=index)
        (logp * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
        grads.append((logp.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_every_criterion_has_a_config_section_and_a_loss():
    from ft.preference.criteria import CRITERIA
    from ft.preference.criterion_config import CRITERION_SECTIONS

    assert CRITERIA.names() == CRITERION_SECTIONS.names()
