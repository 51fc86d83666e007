"""A non-finite loss or gradient norm: under `stop` the run ends with one line and
exit code 3 before anything is saved, keeping the last good checkpoint; under
`skip_step` the bad step makes no update and the run goes on."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ft.recipes.instruction_finetune as recipe
from ft.errors import EXIT_NONFINITE
from tests.recipes.conftest import read_metrics, run_finetune

F32 = ["save_model_dtype=float32", "lr_schedule=constant", "warmup_steps=0"]


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def nan_loss_on_calls(monkeypatch, bad_calls: set[int]) -> None:
    """The loss of the given (1-based) loss_fn calls is nan; one call per step here."""
    real = recipe.next_token_loss
    calls = {"n": 0}

    def patched(chunk_size):
        loss_fn = real(chunk_size)

        def wrapped(model, batch, device):
            calls["n"] += 1
            loss = loss_fn(model, batch, device)
            return loss * float("nan") if calls["n"] in bad_calls else loss

        return wrapped

    monkeypatch.setattr(recipe, "next_token_loss", patched)


def bad_run(out: Path, capsys, *overrides: str) -> str:
    assert run_finetune(out, *overrides) == EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


@pytest.mark.parametrize("publish", [1, 10])
def test_stop_keeps_the_last_good_checkpoint(tmp_path, user_assets, monkeypatch, capsys, publish):
    out = tmp_path / "run"
    settings = [*F32, "checkpoint_every_n_steps=2", "keep_last_n_checkpoints=1", f"publish_metrics_every_n_steps={publish}"]
    assert run_finetune(out, *settings, "max_num_steps=2") == 0
    before = snapshot(out / "checkpoints")
    nan_loss_on_calls(monkeypatch, {2})  # step 4 of the resumed run
    line = bad_run(out, capsys, *settings, "max_num_steps=6")
    # Found at the publish of step 4, or (publishing every 10) before the save of step 4.
    assert "became non-finite (nan or inf) " + ("at step 4" if publish == 1 else "between step 3 and step 4") in line
    assert f"the newest checkpoint, {out / 'checkpoints' / 'step_2'}, is the last good state" in line
    assert "nonfinite_policy=skip_step" in line and "learning_rate" in line
    assert snapshot(out / "checkpoints") == before  # nothing saved, nothing pruned


def test_stop_without_any_checkpoint(tmp_path, user_assets, monkeypatch, capsys):
    nan_loss_on_calls(monkeypatch, {1})
    line = bad_run(tmp_path / "run", capsys, *F32, "max_num_steps=3")
    assert "at step 1" in line and "no checkpoint was saved" in line
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_a_huge_learning_rate_stops_before_saving(tmp_path, user_assets, capsys):
    out = tmp_path / "run"
    line = bad_run(out, capsys, "learning_rate=1e30", "max_grad_norm=null", "max_num_steps=6",
                   "checkpoint_every_n_steps=3", "publish_metrics_every_n_steps=10")
    assert "non-finite" in line and "learning_rate (now 1e+30)" in line
    for step_dir in (out / "checkpoints").glob("step_*"):  # whatever was saved is finite
        for tensor in load_file(next(step_dir.glob("*.safetensors"))).values():
            assert torch.isfinite(tensor.float()).all()


def test_skip_step_makes_no_update(tmp_path, user_assets, monkeypatch, caplog):
    clean = tmp_path / "clean"
    assert run_finetune(clean, *F32, "max_num_steps=1") == 0
    nan_loss_on_calls(monkeypatch, {2})
    skipped = tmp_path / "skipped"
    assert run_finetune(skipped, *F32, "max_num_steps=2", "nonfinite_policy=skip_step") == 0
    assert "step 2: non-finite loss or gradient norm" in (skipped / "logs" / "rank_0.log").read_text()
    a = load_file(clean / "checkpoints" / "step_1" / "model.safetensors")
    b = load_file(skipped / "checkpoints" / "step_2" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # step 2 changed nothing
    losses = [m["loss"] for m in read_metrics(skipped)]
    assert math.isfinite(losses[0]) and math.isnan(losses[1])  # the skipped step's window has no loss


def test_skip_step_trains_on_after_a_bad_step(tmp_path, user_assets, monkeypatch):
    nan_loss_on_calls(monkeypatch, {2})
    out = tmp_path / "run"
    assert run_finetune(out, *F32, "max_num_steps=4", "nonfinite_policy=skip_step",
                        "publish_metrics_every_n_steps=4") == 0
    (values,) = read_metrics(out)
    assert math.isfinite(values["loss"])  # the skipped step left no nan in the window's loss
    weights = load_file(out / "checkpoints" / "step_4" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
