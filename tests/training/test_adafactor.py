"""ft's Adafactor steps exactly as torch's (same gradients, float32), whole or in row
blocks, loads torch's state; with stochastic rounding a bf16 parameter keeps
updates below its resolution, deterministically."""

from __future__ import annotations

import copy

import pytest
import torch

from ft.training.adafactor import Adafactor


def _model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(37, 12), torch.nn.Linear(12, 7), torch.nn.LayerNorm(7)).to(dtype)


def _set_gradients(models, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    for params in zip(*(m.parameters() for m in models)):
        grad = torch.randn(params[0].shape, generator=generator) * (1 + step)
        for p in params:
            p.grad = grad.to(p.dtype).clone()


@pytest.mark.parametrize("max_chunk_numel", [10**9, 50, 12])
def test_steps_as_torchs_adafactor(max_chunk_numel):
    ours_model, torch_model = _model(), _model()
    ours = Adafactor(ours_model.parameters(), lr=1e-2, weight_decay=0.1, max_chunk_numel=max_chunk_numel)
    reference = torch.optim.Adafactor(torch_model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(8):
        _set_gradients([ours_model, torch_model], step)
        ours.step()
        reference.step()
    for (name, got), want in zip(ours_model.named_parameters(), torch_model.parameters()):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7, msg=name)
    for got, want in zip(ours.state_dict()["state"].values(), reference.state_dict()["state"].values()):
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=2e-6, atol=1e-9)


def test_continues_from_torchs_state():
    ours_model, torch_model = _model(), _model()
    reference = torch.optim.Adafactor(torch_model.parameters(), lr=1e-2, foreach=False)
    _set_gradients([torch_model], 0)
    reference.step()
    ours_model.load_state_dict(torch_model.state_dict())
    ours = Adafactor(ours_model.parameters(), lr=1e-2, max_chunk_numel=50)
    ours.load_state_dict(copy.deepcopy(reference.state_dict()))
    _set_gradients([ours_model, torch_model], 1)
    ours.step()
    reference.step()
    for got, want in zip(ours_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)


def _train_bf16(stochastic_rounding: bool, steps: int = 200) -> torch.Tensor:
    # Updates of about 1e-4 on weights of about 1: far below bf16's resolution there (2**-7).
    param = torch.nn.Parameter(torch.ones(64, 32, dtype=torch.bfloat16))
    optimizer = Adafactor([param], lr=1e-4, stochastic_rounding=stochastic_rounding, seed=3)
    for _ in range(steps):
        param.grad = torch.ones_like(param)
        optimizer.step()
    return param.detach()


def test_stochastic_rounding_keeps_updates_below_bf16_resolution():
    plain, rounded = _train_bf16(False), _train_bf16(True)
    assert torch.all(plain == 1)  # every step rounded away
    # 200 steps of ~1e-4 (Adafactor's relative step): the mean moves by about 2e-2
    assert 0.015 < float(1 - rounded.float().mean()) < 0.025
    assert torch.equal(rounded, _train_bf16(True))  # deterministic


def test_stochastic_rounding_keeps_float32_states_and_follows_float32():
    bf16_model, fp32_model = _model(torch.bfloat16), _model()
    bf16_model.load_state_dict(fp32_model.state_dict())
    rounded = Adafactor(bf16_model.parameters(), lr=1e-2, stochastic_rounding=True, max_chunk_numel=50)
    exact = Adafactor(fp32_model.parameters(), lr=1e-2)
    for step in range(5):
        _set_gradients([fp32_model], step)
        for p, q in zip(bf16_model.parameters(), fp32_model.parameters()):
            p.grad = q.grad.to(torch.bfloat16)
        rounded.step()
        exact.step()
    assert all(v.dtype == torch.float32 for s in rounded.state.values() for k, v in s.items() if k != "step")
    errors = []
    for got, want in zip(bf16_model.parameters(), fp32_model.parameters()):
        # the start rounded to bf16, then a random walk of at most one ulp a step: a few ulps at worst,
        # under two on average (over all 565 elements: a 7-element norm alone is too few to average)
        torch.testing.assert_close(got.float(), want, rtol=8 * 2**-8, atol=2e-3)
        errors.append(((got.float() - want).abs() / want.abs().clamp(min=1e-3)).detach().flatten())
    assert float(torch.cat(errors).median()) < 2 * 2**-8


def test_hashed_rounding_is_unbiased_and_independent_of_blocks():
    from ft.training.stochastic_rounding import hashed_round_to_bf16

    ulp = 2.0**-7  # bf16's spacing in [1, 2)
    x = torch.full((300, 400), 1 + 0.3 * ulp)
    key = torch.tensor(987654321, dtype=torch.int32)
    whole = hashed_round_to_bf16(x, key)
    assert set(whole.unique().tolist()) == {1.0, 1 + ulp}
    assert abs(float((whole == 1 + ulp).float().mean()) - 0.3) < 0.01  # rounds up with probability 0.3
    blocks = torch.cat([hashed_round_to_bf16(x[lo:lo + 70], key, lo * 400) for lo in range(0, 300, 70)])
    assert torch.equal(blocks, whole)
    assert not torch.equal(hashed_round_to_bf16(x, torch.tensor(987654322, dtype=torch.int32)), whole)  # another key, other bits


@pytest.mark.parametrize("stochastic_rounding", [False, True])
def test_matrix_passes_trace_whole_and_match_eager(stochastic_rounding):
    """On GPUs the three passes over a matrix run compiled; the same functions traced as
    one graph each (fullgraph: no graph breaks) step bitwise as they do eagerly, with the
    step's scalars as tensors and block offsets included."""
    from ft.training import adafactor

    torch.manual_seed(0)
    rows, cols = 37, 24
    grad, param = torch.randn(rows, cols).bfloat16(), torch.randn(rows, cols).bfloat16()
    key = torch.tensor(12345, dtype=torch.int32) if stochastic_rounding else None
    traced = {name: torch.compile(fn, dynamic=True, fullgraph=True, backend="aot_eager")
              for name, fn in (("stats", adafactor.factored_statistics), ("sq", adafactor.factored_update_sq),
                               ("apply", adafactor.apply_factored_update))}
    results = []
    for stats, sq, apply, scalar in ((adafactor.factored_statistics, adafactor.factored_update_sq,
                                      adafactor.apply_factored_update, float),
                                     (traced["stats"], traced["sq"], traced["apply"], torch.tensor)):
        target, row_var, col_var = param.clone(), torch.rand(rows, 1, generator=torch.Generator().manual_seed(1)), \
            torch.rand(1, cols, generator=torch.Generator().manual_seed(2))
        param_sq, row_mean = stats(target, grad, row_var, col_var, scalar(0.2), 1e-30)
        blocks = [(0, 16), (16, 32), (32, 37)]
        update_sq = sum(sq(grad[lo:hi], row_var[lo:hi], col_var, row_mean, 1e-60, torch.float32) for lo, hi in blocks)
        for lo, hi in blocks:
            apply(target[lo:hi], grad[lo:hi], row_var[lo:hi], col_var, row_mean, 1e-60, torch.float32,
                  torch.tensor(0.99), param_sq, update_sq, torch.tensor(0.01), rows * cols, 1e-3, 1.0, key, lo * cols)
        results.append((target, row_var, col_var))
    (eager, eager_row, eager_col), (compiled, compiled_row, compiled_col) = results
    assert not torch.equal(eager, param)
    assert torch.equal(compiled, eager)
    assert torch.equal(compiled_row, eager_row) and torch.equal(compiled_col, eager_col)
