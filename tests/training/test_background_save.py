"""Checkpoints written on a worker thread: the loop goes on while a save is written,
the state saved is the state at the save (not what training did meanwhile), a step
is published only when complete, a failed background save surfaces at the next
save with nothing half-written left, and model-only checkpoints hold no trainer state."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ft.errors import OutputDirError
from ft.training import checkpoint as checkpoint_module
from ft.training.checkpoint import CheckpointManager, list_step_dirs
from ft.training.manifest import read_manifest

from tests.training.test_checkpoint_safety import MODEL_CONFIG, make_model, train_step


def manager(directory: Path, **kwargs) -> CheckpointManager:
    return CheckpointManager(directory, is_main=True, barrier=lambda: None, keep_last_n_checkpoints=None,
                             keep_last_n_models=None, background=True, **kwargs)


def save(mgr: CheckpointManager, step: int, model, optimizer, *, model_only: bool = False) -> Path:
    def export(directory: Path):
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}  # gathered now, written later

        def write() -> None:
            save_file(weights, str(directory / "model.safetensors"))
            (directory / "config.json").write_text("{}")

        return write

    return mgr.save(step, model=model, optimizer=optimizer, extra={"step": step}, model_config=MODEL_CONFIG,
                    export_model=export, model_only=model_only)


@pytest.fixture
def blocked_seal(monkeypatch):
    """Holds the worker inside `seal` until the test releases it."""
    release, entered = threading.Event(), threading.Event()
    real_seal = checkpoint_module.seal

    def seal(*args, **kwargs):
        entered.set()
        assert release.wait(30), "the test never released the worker"
        return real_seal(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "seal", seal)
    yield entered, release
    release.set()


def test_loop_goes_on_while_the_save_is_written_and_the_saved_state_is_the_state_at_the_save(tmp_path, blocked_seal):
    entered, release = blocked_seal
    model, optimizer = make_model()
    mgr = manager(tmp_path / "checkpoints")
    train_step(model, optimizer)
    at_save = {k: v.clone() for k, v in model.state_dict().items()}
    final = save(mgr, 1, model, optimizer)  # returns while the worker is held
    assert entered.wait(30)
    for _ in range(3):  # training goes on, changing the weights in place
        train_step(model, optimizer)
    # A crash now would leave only step_1.tmp (removed at the next start): no damaged step.
    assert not final.exists() and list_step_dirs(mgr.dir) == {}
    assert CheckpointManager(mgr.dir, is_main=True, barrier=lambda: None, keep_last_n_checkpoints=None,
                             keep_last_n_models=None).latest_resumable_step() is None
    release.set()
    mgr.close()
    assert final.is_dir() and read_manifest(final) is not None
    saved = load_file(str(final / "model.safetensors"))
    assert all(torch.equal(saved[k], at_save[k]) for k in at_save)
    restored, restored_optimizer = make_model(seed=1)
    mgr.load(1, model=restored, optimizer=restored_optimizer, model_config=MODEL_CONFIG)
    assert all(torch.equal(restored.state_dict()[k], at_save[k]) for k in at_save)


def test_next_save_waits_for_the_previous_one(tmp_path):
    model, optimizer = make_model()
    mgr = manager(tmp_path / "checkpoints")
    for step in (1, 2, 3):
        train_step(model, optimizer)
        save(mgr, step, model, optimizer)
    mgr.close()
    assert sorted(list_step_dirs(mgr.dir)) == [1, 2, 3]
    assert mgr.latest_resumable_step() == 3


def test_a_failed_background_save_surfaces_at_the_next_save_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    model, optimizer = make_model()
    mgr = manager(tmp_path / "checkpoints")
    save(mgr, 1, model, optimizer)
    mgr.wait()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "seal", disk_full)
    save(mgr, 2, model, optimizer)  # fails on the worker
    with pytest.raises(OutputDirError, match="newest complete checkpoint is step_1"):
        save(mgr, 3, model, optimizer)
    assert sorted(p.name for p in mgr.dir.iterdir()) == ["step_1"]


def test_model_only_checkpoints_hold_no_trainer_state(tmp_path):
    model, optimizer = make_model()
    mgr = manager(tmp_path / "checkpoints")
    final = save(mgr, 1, model, optimizer, model_only=True)
    mgr.close()
    assert not (final / "trainer").exists() and (final / "model.safetensors").is_file()
    assert set(read_manifest(final).files) == {"model.safetensors", "config.json"}
    assert mgr.latest_resumable_step() is None
