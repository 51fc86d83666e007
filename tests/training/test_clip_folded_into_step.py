"""Gradient clipping folded into torch's fused AdamW (`optimizer_step`): the factor is
handed to the step as its `grad_scale` instead of rewriting every gradient first. The
update is the one of clipping then stepping, and the reported norm the unclipped one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ft.training.optim import build_scheduler, clip_grad_norm
from ft.training.step import clip_folds_into_step, optimizer_step


def _model_and_grads(seed: int, grad_size: float) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * grad_size
    return model


def _optimizer(model: nn.Module, *, fused: bool) -> torch.optim.AdamW:
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kwargs)


def _step(model: nn.Module, optimizer, max_grad_norm: float | None, steps: int = 3) -> torch.Tensor:
    scheduler = build_scheduler(optimizer, schedule="constant", warmup_steps=0, max_num_steps=100, final_lr_scale=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    norms = []
    for i in range(steps):
        if i:  # fresh gradients each step, the same for every run
            g = torch.Generator().manual_seed(i)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g) * 10.0
        norms.append(optimizer_step(model, optimizer, scheduler, scaler, max_grad_norm=max_grad_norm))
    return torch.stack(norms)


@pytest.mark.parametrize("grad_size", [10.0, 1e-3])  # clipped, and below the limit (factor 1)
def test_folded_clipping_steps_as_clipping_then_stepping(grad_size):
    folded_model = _model_and_grads(0, grad_size)
    folded = _optimizer(folded_model, fused=True)
    assert clip_folds_into_step(folded, torch.amp.GradScaler("cpu", enabled=False))
    plain_model = _model_and_grads(0, grad_size)
    plain = _optimizer(plain_model, fused=False)
    assert not clip_folds_into_step(plain, torch.amp.GradScaler("cpu", enabled=False))

    expected_norm = clip_grad_norm(_model_and_grads(0, grad_size), None)
    folded_norms = _step(folded_model, folded, max_grad_norm=1.0)
    plain_norms = _step(plain_model, plain, max_grad_norm=1.0)
    assert torch.allclose(folded_norms[0], expected_norm)  # the norm before clipping
    assert torch.allclose(folded_norms, plain_norms, rtol=1e-6)
    for a, b in zip(folded_model.parameters(), plain_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not hasattr(folded, "grad_scale")  # the hook is removed after the step
    assert all(p.grad is None for p in folded_model.parameters())


def test_the_fold_actually_clips():
    clipped_model, unclipped_model = _model_and_grads(0, 10.0), _model_and_grads(0, 10.0)
    _step(clipped_model, _optimizer(clipped_model, fused=True), max_grad_norm=1e-3, steps=1)
    _step(unclipped_model, _optimizer(unclipped_model, fused=True), max_grad_norm=None, steps=1)
    assert any(not torch.allclose(a, b) for a, b in zip(clipped_model.parameters(), unclipped_model.parameters()))


def test_no_fold_with_a_loss_scaler_or_another_optimizer():
    model = _model_and_grads(0, 1.0)
    fused = _optimizer(model, fused=True)

    class Enabled:
        def is_enabled(self) -> bool:
            return True

    assert not clip_folds_into_step(fused, Enabled())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert not clip_folds_into_step(sgd, torch.amp.GradScaler("cpu", enabled=False))
