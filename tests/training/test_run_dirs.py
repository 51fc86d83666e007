"""`resume_checkpoint_dir` / `checkpoint_dir` may name OUT, OUT/checkpoints of a
sweep-dir run, or the run directory; several candidates are named."""

from __future__ import annotations

import logging

import pytest

from ft.errors import CheckpointError
from ft.training.checkpoint import resolve_model_checkpoint


def make_run(out, name, step=10):
    step_dir = out / name / "checkpoints" / f"step_{step}"
    step_dir.mkdir(parents=True)
    (step_dir / "model.safetensors").write_bytes(b"")
    return step_dir


def test_out_and_missing_out_checkpoints_find_the_single_run(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ft")
    step_dir = make_run(tmp_path / "run1_output", "ft_abc")
    for asked in ("run1_output", "run1_output/checkpoints", "run1_output/ft_abc", "run1_output/ft_abc/checkpoints"):
        assert resolve_model_checkpoint(tmp_path / asked, "last_checkpoint") == step_dir
    assert resolve_model_checkpoint(tmp_path / "run1_output/checkpoints", "checkpoint_step_10") == step_dir
    assert "using" in caplog.text and "ft_abc" in caplog.text


def test_several_runs_are_named(tmp_path):
    make_run(tmp_path / "out", "ft_one")
    make_run(tmp_path / "out", "ft_two")
    with pytest.raises(CheckpointError, match=r"several runs .*ft_one/checkpoints.*ft_two/checkpoints"):
        resolve_model_checkpoint(tmp_path / "out" / "checkpoints", "last_checkpoint")
