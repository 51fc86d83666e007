"""torchao's 8-bit and 4-bit AdamW on a tiny Llama (CPU): the loss falls and stays
within a stated tolerance of AdamW's over 50 steps, and a run resumed from a
checkpoint (CheckpointManager, foreground and background saves) is bitwise the
uninterrupted run.

torchao compiles its optimizer step with torch.compile; on a 2-core CPU that costs
about 20 s per parameter shape (minutes for this model's shapes and both optimizers),
so these tests run the same step eagerly (`force_eager`). The compiled step rounds
differently: its loss curves were within 0.02% of these (docs/optimizers.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import save_file

from ft.models import build_model
from ft.models.llama.model import LlamaConfig
from ft.training.checkpoint import CheckpointManager
from ft.training.optim import build_scheduler
from ft.training.optimizers import OPTIMIZERS, OptimizerSettings, build_optimizer

pytest.importorskip("torchao.optim")

# Every matrix but k/v has >= 4096 elements and a multiple of the block size (256, 128),
# so torchao quantizes its states; k/v (2048) and the norms keep float32 states.
CONFIG = LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)
STEPS, LEARNING_RATE = 50, 3e-3
# Largest relative difference from AdamW's loss at any of the 50 steps. Measured at
# seeds 0-3 (torch 2.13, torchao 0.17): at most 3.1% (8-bit) and 4.8% (4-bit); AdamW
# itself at a 1/3 larger learning rate differs by 22-24%, so the bounds still catch a
# wrong step size or a state that stopped tracking the gradients.
TOLERANCE = {"adamw8bit": 0.05, "adamw4bit": 0.08}
STATE_CLASS = {"adamw8bit": "OptimState8bit", "adamw4bit": "OptimState4bit"}


@pytest.fixture(autouse=True)
def eager_optimizer_step():
    with torch.compiler.set_stance("force_eager"):
        yield


def batches() -> list[torch.Tensor]:
    """Four fixed batches in turn: the loss falls by about half in 50 steps, far from zero."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, CONFIG.vocab_size, (4, 32), generator=generator) for _ in range(4)]


def make(name: str, *, learning_rate: float = LEARNING_RATE, seed: int = 0):
    model = build_model(CONFIG, device="cpu", seed=seed)
    optimizer = build_optimizer(model, OptimizerSettings(name=name, learning_rate=learning_rate, weight_decay=0.1))
    # The trainer's schedule: it writes the learning rate into torchao's tensor `lr` in place.
    scheduler = build_scheduler(optimizer, schedule="cosine", warmup_steps=5, max_num_steps=STEPS, final_lr_scale=0.1)
    return model, optimizer, scheduler


def train(model, optimizer, scheduler, steps: range) -> list[float]:
    data = batches()
    losses = []
    for step in steps:
        tokens_BT = data[step % len(data)]
        logits_BTV = model(tokens_BT)
        loss = F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1), tokens_BT[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.item())
    return losses


def relative_difference(losses: list[float], reference: list[float]) -> torch.Tensor:
    reference_S = torch.tensor(reference)
    return (torch.tensor(losses) - reference_S).abs() / reference_S


def test_low_bit_loss_curves_stay_within_tolerance_of_adamw():
    adamw = train(*make("adamw"), range(STEPS))
    assert adamw[-1] < 0.6 * adamw[0]
    faster = train(*make("adamw", learning_rate=LEARNING_RATE * 4 / 3), range(STEPS))
    assert relative_difference(faster, adamw).max() > 2 * max(TOLERANCE.values())  # the bounds can fail
    for name, tolerance in TOLERANCE.items():
        model, optimizer, scheduler = make(name)
        losses = train(model, optimizer, scheduler, range(STEPS))
        assert losses[-1] < 0.6 * losses[0], name
        difference = relative_difference(losses, adamw)
        assert difference.max() <= tolerance, f"{name}: {difference.max():.3f} at step {difference.argmax()}"
        states = {type(optimizer.state[p]["exp_avg"]).__name__ for p in model.parameters()}
        assert states == {STATE_CLASS[name], "Tensor"}  # quantized states were exercised, and the small ones kept


@pytest.mark.parametrize("name", ["adamw8bit", "adamw4bit"])
def test_state_bytes_match_the_memory_model(name):
    """Quantized: 64 x 64; 130 x 64 for 4-bit only (a multiple of 128, not 256). Kept in
    the parameter's dtype: fewer than 4096 values, or not a multiple of the block."""
    shapes = [(64, 64), (130, 64), (65, 64), (32, 64), (64,)]
    model = nn.ParameterList([nn.Parameter(torch.randn(shape, dtype=dtype)) for shape in shapes
                              for dtype in (torch.float32, torch.bfloat16)])
    optimizer = build_optimizer(model, OptimizerSettings(name=name, learning_rate=1e-3))
    sum(p.float().square().sum() for p in model).backward()
    optimizer.step()
    actual = 0
    for p in model:
        for key in ("exp_avg", "exp_avg_sq"):
            state = optimizer.state[p][key]
            # torchao's code table (qmap) is a few hundred bytes per tensor, whatever its size: not counted
            parts = [state.codes, state.scale] if type(state) is not torch.Tensor else [state]
            actual += sum(t.numel() * t.element_size() for t in parts)
    predicted = sum(OPTIMIZERS.get(name).state_bytes(tuple(p.shape), p.element_size()) for p in model)
    assert actual == predicted


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
@pytest.mark.parametrize("name", ["adamw8bit", "adamw4bit"])
def test_low_bit_state_resumes_bitwise_from_a_checkpoint(tmp_path: Path, name: str, background: bool):
    """Saved and loaded by CheckpointManager, as the recipes do: the optimizer state
    through torch.distributed.checkpoint, the schedule in the extra state. A background
    save stages the state in host memory first; it must stay quantized there."""
    total, saved_at = 10, 5
    full = make(name)
    expected = train(*full, range(total))

    first = make(name)
    train(*first, range(saved_at))
    mgr = CheckpointManager(tmp_path / "checkpoints", is_main=True, barrier=lambda: None, keep_last_n_checkpoints=None,
                            keep_last_n_models=None, background=background)

    def export(directory: Path) -> None:
        save_file({k: v.detach().clone() for k, v in first[0].state_dict().items()}, str(directory / "model.safetensors"))

    mgr.save(saved_at, model=first[0], optimizer=first[1], extra={"scheduler": first[2].state_dict()},
             model_config={"dim": CONFIG.dim}, export_model=export)
    train(*first, range(saved_at, total))  # training goes on while a background save is written
    mgr.close()

    model, optimizer, scheduler = make(name, seed=5)
    extra = mgr.load(saved_at, model=model, optimizer=optimizer, model_config={"dim": CONFIG.dim})
    scheduler.load_state_dict(extra["scheduler"])
    assert train(model, optimizer, scheduler, range(saved_at, total)) == expected[saved_at:]
    for p, q in zip(full[0].parameters(), model.parameters()):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = full[1].state[p][key], optimizer.state[q][key]
            assert type(a) is type(b)
            if type(a) is torch.Tensor:
                assert torch.equal(a, b)
            else:  # the quantized codes and scales themselves
                assert all(torch.equal(getattr(a, t), getattr(b, t)) for t in a.__tensor_flatten__()[0])
