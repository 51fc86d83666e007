"""`CompiledAdamW`: torch's AdamW rule and state, stepped by one compiled function.

It must step as torch's AdamW steps (float32: to rounding; bfloat16: as the float32
math rounded once per step, which is what torch's fused kernel computes), keep torch's
state layout (a checkpoint moves between the two), take the clipping factor as its
`grad_scale`, and not recompile when the learning rate changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ft.training.compiled_adamw import CompiledAdamW
from ft.training.optim import build_optimizer, build_scheduler
from ft.training.step import clip_folds_into_step, optimizer_step

KW = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}


def _params(seed: int, dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=g).to(dtype)) for shape in [(7, 5), (5,), (3, 4, 2)]]


def _groups(params: list[nn.Parameter]) -> list[dict]:
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]


def _set_grads(params: list[nn.Parameter], step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.device, p.dtype)  # the same values on any device


def _run(optimizer, params, steps: int, *, start: int = 0, lr_decay: float = 0.7) -> None:
    for i in range(start, start + steps):
        _set_grads(params, i)
        optimizer.step()
        for group in optimizer.param_groups:  # a schedule: a new learning rate every step
            group["lr"] *= lr_decay


@pytest.mark.parametrize("compile", [False, True])
def test_steps_as_torch_adamw_in_float32(compile):
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    ours, theirs = _params(0), _params(0)
    optimizer = CompiledAdamW(_groups(ours), compile=compile, **KW)
    _run(optimizer, ours, 4)
    _run(torch.optim.AdamW(_groups(theirs), foreach=False, **KW), theirs, 4)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    if compile:  # four learning rates, three shapes, two weight decays: not a graph for each
        assert counters["stats"]["unique_graphs"] - graphs_before <= 2


def test_bfloat16_is_the_float32_step_rounded_once():
    ours = _params(0, torch.bfloat16)
    reference = [nn.Parameter(p.detach().float()) for p in ours]
    optimizer = CompiledAdamW(_groups(ours), compile=False, **KW)
    reference_optimizer = torch.optim.AdamW(_groups(reference), foreach=False, **KW)
    for i in range(3):
        _set_grads(ours, i)
        for r, p in zip(reference, ours):
            r.grad = p.grad.float()
        optimizer.step()
        reference_optimizer.step()
        # What a bf16 step keeps: the parameters and moments rounded to bf16.
        for r, p in zip(reference, ours):
            state, ref_state = optimizer.state[p], reference_optimizer.state[r]
            assert state["exp_avg"].dtype == torch.bfloat16
            torch.testing.assert_close(p, r.detach().to(torch.bfloat16), rtol=0, atol=0)
            torch.testing.assert_close(state["exp_avg"], ref_state["exp_avg"].to(torch.bfloat16), rtol=0, atol=0)
            torch.testing.assert_close(state["exp_avg_sq"], ref_state["exp_avg_sq"].to(torch.bfloat16),
                                       rtol=0, atol=0)
            with torch.no_grad():  # continue the reference from the rounded values, as the bf16 run does
                r.copy_(p.float())
                ref_state["exp_avg"].copy_(state["exp_avg"].float())
                ref_state["exp_avg_sq"].copy_(state["exp_avg_sq"].float())


def test_grad_scale_divides_the_gradients():
    scaled, prescaled = _params(0), _params(0)
    a, b = CompiledAdamW(scaled, compile=False, **KW), CompiledAdamW(prescaled, compile=False, **KW)
    _set_grads(scaled, 0)
    _set_grads(prescaled, 0)
    for p in prescaled:
        p.grad /= 4.0
    a.grad_scale = torch.tensor(4.0)
    a.step()
    b.step()
    for x, y in zip(scaled, prescaled):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_state_moves_between_torch_adamw_and_compiled_adamw():
    """A checkpoint of either resumes in the other, and resuming equals not stopping."""
    straight, resumed = _params(0), _params(0)
    _run(CompiledAdamW(_groups(straight), compile=False, **KW), straight, 5)

    first = torch.optim.AdamW(_groups(resumed), foreach=False, **KW)
    _run(first, resumed, 3)
    state = first.state_dict()
    assert set(CompiledAdamW(_groups(_params(1)), compile=False, **KW).state_dict()["param_groups"][0]) >= {
        "lr", "betas", "eps", "weight_decay"}
    second = CompiledAdamW(_groups(resumed), compile=False, **KW)
    second.load_state_dict(state)
    _run(second, resumed, 2, start=3)
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # ...and back: its state loads into torch's AdamW.
    back = torch.optim.AdamW(_groups(resumed), foreach=False, **KW)
    back.load_state_dict(second.state_dict())
    assert float(back.state_dict()["state"][0]["step"]) == 5.0


def test_the_recipe_step_folds_clipping_into_it():
    def model_with_grads() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 10.0
        return model

    scaler = torch.amp.GradScaler("cpu", enabled=False)
    results = []
    for implementation in ("compiled", "fused"):  # "fused" is foreach on a CPU: clipped by a pass over the grads
        model = model_with_grads()
        optimizer = build_optimizer(model, learning_rate=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                    implementation=implementation)
        assert clip_folds_into_step(optimizer, scaler) == (implementation == "compiled")
        scheduler = build_scheduler(optimizer, schedule="constant", warmup_steps=0, max_num_steps=10,
                                    final_lr_scale=1.0)
        norm = optimizer_step(model, optimizer, scheduler, scaler, max_grad_norm=1.0)
        assert not hasattr(optimizer, "grad_scale")
        results.append((norm, [p.detach().clone() for p in model.parameters()]))
    (norm_a, params_a), (norm_b, params_b) = results
    torch.testing.assert_close(norm_a, norm_b)
    assert float(norm_a) > 1.0  # the step was clipped
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_unsupported_options_are_refused():
    params = _params(0)
    _set_grads(params, 0)
    with pytest.raises(ValueError, match="amsgrad"):
        optimizer = CompiledAdamW(params, compile=False, **KW)
        optimizer.param_groups[0]["amsgrad"] = True
        optimizer.step()
    with pytest.raises(ValueError, match="unknown AdamW implementation"):
        build_optimizer(nn.Linear(2, 2), learning_rate=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                        implementation="apex")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_on_cuda_matches_torch_fused(dtype):
    ours = [nn.Parameter(p.detach().cuda()) for p in _params(0, dtype)]
    theirs = [nn.Parameter(p.detach().cuda()) for p in _params(0, dtype)]
    a = CompiledAdamW(_groups(ours), **KW)
    b = torch.optim.AdamW(_groups(theirs), fused=True, **KW)
    for i in range(4):
        _set_grads(ours, i)
        _set_grads(theirs, i)
        a.grad_scale = b.grad_scale = torch.tensor(2.0, device="cuda")
        a.step()
        b.step()
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, **tolerance)


def test_row_views_step_as_torch_adamw_with_few_graphs():
    """Lengths that are multiples of 1,024 go through [rows, 1024] views (one graph for any
    row count), the rest through 1-D views (another)."""
    from torch._dynamo.utils import counters

    from ft.training.compiled_adamw import _rows

    assert _rows(torch.zeros(4, 512)).shape == (2, 1024)
    assert _rows(torch.zeros(1024)).shape == (1024,)  # one row: a 1-D view (no graph of its own)
    assert _rows(torch.zeros(7, 5)).shape == (35,)
    shapes = [(4, 512), (2048,), (3, 1024), (1024,), (7, 5), (6,)]
    g = torch.Generator().manual_seed(3)
    ours = [nn.Parameter(torch.randn(shape, generator=g)) for shape in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    graphs_before = counters["stats"]["unique_graphs"]
    optimizer = CompiledAdamW(_groups(ours), compile=True, **KW)
    _run(optimizer, ours, 3)
    _run(torch.optim.AdamW(_groups(theirs), foreach=False, **KW), theirs, 3)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert counters["stats"]["unique_graphs"] - graphs_before <= 2  # one for rows, one for 1-D views
