"""`keep_last_n_checkpoints` / `keep_last_n_models`: after each save only the newest N
complete checkpoints keep their trainer state (resp. model weights), a step with
neither is removed, and whatever ft did not finish or did not write is left alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ft.training.checkpoint import CheckpointManager, list_step_dirs

# One process saving without a process group is the intended CPU case.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

MODEL_CONFIG = {"dim": 4}


@pytest.fixture
def model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()  # so the optimizer has state to save
    return model, optimizer


def manager(directory: Path, *, keep_checkpoints: int | None, keep_models: int | None) -> CheckpointManager:
    return CheckpointManager(directory, is_main=True, barrier=lambda: None,
                             keep_last_n_checkpoints=keep_checkpoints, keep_last_n_models=keep_models)


def save_steps(mgr: CheckpointManager, steps, model, optimizer) -> None:
    def export(directory: Path) -> None:
        save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
        (directory / "config.json").write_text("{}")

    for step in steps:
        mgr.save(step, model=model, optimizer=optimizer, extra={"step": step}, model_config=MODEL_CONFIG,
                 export_model=export)


def layout(checkpoint_dir: Path) -> dict[int, tuple[bool, bool]]:
    """step -> (has trainer state, has model weights)."""
    return {
        step: ((path / "trainer" / ".metadata").is_file(), (path / "model.safetensors").is_file())
        for step, path in list_step_dirs(checkpoint_dir).items()
    }


def test_without_limits_every_checkpoint_is_kept(tmp_path, model_and_optimizer):
    mgr = manager(tmp_path, keep_checkpoints=None, keep_models=None)
    save_steps(mgr, [10, 20, 30], *model_and_optimizer)
    assert layout(tmp_path) == {10: (True, True), 20: (True, True), 30: (True, True)}


def test_keep_last_n_checkpoints_drops_older_trainer_state_but_keeps_models(tmp_path, model_and_optimizer):
    mgr = manager(tmp_path, keep_checkpoints=2, keep_models=None)
    save_steps(mgr, [10, 20, 30, 40], *model_and_optimizer)
    assert layout(tmp_path) == {10: (False, True), 20: (False, True), 30: (True, True), 40: (True, True)}
    assert mgr.latest_resumable_step() == 40


def test_keep_last_n_models_drops_older_weights_but_keeps_trainer_state(tmp_path, model_and_optimizer):
    mgr = manager(tmp_path, keep_checkpoints=None, keep_models=1)
    save_steps(mgr, [10, 20, 30], *model_and_optimizer)
    assert layout(tmp_path) == {10: (True, False), 20: (True, False), 30: (True, True)}


def test_a_step_with_neither_state_nor_model_is_removed(tmp_path, model_and_optimizer):
    mgr = manager(tmp_path, keep_checkpoints=1, keep_models=2)
    save_steps(mgr, [10, 20, 30, 40], *model_and_optimizer)
    assert layout(tmp_path) == {30: (False, True), 40: (True, True)}
    assert not (tmp_path / "step_10").exists() and not (tmp_path / "step_20").exists()


def test_pruning_happens_after_every_save(tmp_path, model_and_optimizer):
    mgr = manager(tmp_path, keep_checkpoints=2, keep_models=2)
    for step in (10, 20, 30, 40, 50):
        save_steps(mgr, [step], *model_and_optimizer)
        steps = sorted(layout(tmp_path))
        assert steps == [s for s in (10, 20, 30, 40, 50) if s <= step][-2:]


def test_steps_are_ordered_numerically_not_by_name(tmp_path, model_and_optimizer):
    # "step_100" sorts before "step_20" as text; the newest is still step 100.
    mgr = manager(tmp_path, keep_checkpoints=1, keep_models=1)
    save_steps(mgr, [9, 20, 100], *model_and_optimizer)
    assert layout(tmp_path) == {100: (True, True)}


def test_keeping_more_than_exist_removes_nothing(tmp_path, model_and_optimizer):
    mgr = manager(tmp_path, keep_checkpoints=5, keep_models=5)
    save_steps(mgr, [10, 20], *model_and_optimizer)
    assert layout(tmp_path) == {10: (True, True), 20: (True, True)}


def test_resaving_the_newest_step_does_not_prune_it(tmp_path, model_and_optimizer):
    # The final save of a run often repeats the last periodic one.
    mgr = manager(tmp_path, keep_checkpoints=1, keep_models=1)
    save_steps(mgr, [10, 20, 20], *model_and_optimizer)
    assert layout(tmp_path) == {20: (True, True)}
    assert mgr.latest_resumable_step() == 20


def test_incomplete_and_foreign_entries_are_left_alone(tmp_path, model_and_optimizer):
    # An interrupted save of an older step, a user's notes, files beside the steps,
    # and a directory whose name only looks like a step: none of them is ft's to prune.
    interrupted = tmp_path / "step_5.tmp"
    (interrupted / "trainer").mkdir(parents=True)
    (interrupted / "trainer" / "partial.distcp").write_bytes(b"half")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "run.txt").write_text("lr sweep 3")
    (tmp_path / "README.txt").write_text("mine")
    (tmp_path / "step_final").mkdir()
    (tmp_path / "step_final" / "model.safetensors").write_bytes(b"not ft's")

    mgr = manager(tmp_path, keep_checkpoints=1, keep_models=1)
    save_steps(mgr, [10, 20, 30], *model_and_optimizer)

    assert layout(tmp_path) == {30: (True, True)}
    assert (interrupted / "trainer" / "partial.distcp").read_bytes() == b"half"
    assert (tmp_path / "notes" / "run.txt").read_text() == "lr sweep 3"
    assert (tmp_path / "README.txt").read_text() == "mine"
    assert (tmp_path / "step_final" / "model.safetensors").read_bytes() == b"not ft's"
