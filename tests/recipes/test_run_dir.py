"""The run directory OUT: one run at a time (the lock is taken before anything is
written), OUT/config.yaml is never overwritten by another command or when it is an
input, and resuming with a setting the saved state depends on is refused."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import yaml

from ft.cli import main
from ft.training.run_lock import LOCK_NAME, lock_output_dir
from tests.recipes.conftest import FAST, run_finetune


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != LOCK_NAME and "logs" not in p.parts}


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FT_USER_ASSET_DIR", str(tmp_path_factory.mktemp("no_user_cards")))
        out = tmp_path_factory.mktemp("trained") / "run"
        assert run_finetune(out, "max_num_steps=2") == 0
    return out


@pytest.fixture
def trained(trained_once, user_assets):
    return trained_once, snapshot(trained_once)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


def test_a_locked_out_is_refused_before_anything_is_written(trained, capsys):
    out, before = trained
    with lock_output_dir(out):  # another run holds OUT
        assert run_finetune(out, "max_num_steps=4") == 1
    line = one_error_line(capsys)
    assert f"{out} is in use by another ft run (pid {os.getpid()}" in line
    assert snapshot(out) == before


def test_generate_into_a_training_out_keeps_its_config(trained, capsys):
    out, before = trained
    code = main(["lm", "generate", str(out), "--no-sweep-dir", "--config",
                 f"checkpoint_dir={out / 'checkpoints'}", "model=last_checkpoint"])
    assert code == 1
    line = one_error_line(capsys)
    assert f"{out / 'config.yaml'} is not a config of this command" in line and "another output directory" in line
    assert snapshot(out) == before and not (out / "output").exists()


def test_the_runs_own_config_file_is_not_rewritten(trained, capsys):
    out, before = trained
    args = ["lm", "instruction_finetune", str(out), "--no-sweep-dir", "--config-file", str(out / "config.yaml")]
    assert main([*args, "--config", "max_num_steps=3"]) == 2
    line = one_error_line(capsys)
    assert f"--config-file {out / 'config.yaml'} is this run's own config.yaml" in line
    assert snapshot(out) == before
    assert main(args) == 0  # the same config: resumes (nothing left to do), the file untouched
    assert snapshot(out) == before


@pytest.mark.parametrize("change", ["learning_rate=1e-4", "max_num_tokens=512", "packing=false", "dtype=float16",
                                    "betas=[0.8, 0.95]"])
def test_resume_with_a_setting_the_saved_state_depends_on_is_refused(trained, capsys, change):
    out, before = trained
    key, value = change.split("=")
    assert run_finetune(out, change, "max_num_steps=4") == 2
    line = one_error_line(capsys)
    recorded = yaml.safe_load((out / "config.yaml").read_text())[key]
    assert f"cannot resume {out} with {key}=" in line and f"made with {key}={recorded!r}" in line
    assert "resume_checkpoint_dir=" in line
    assert snapshot(out) == before


def test_resume_applies_a_longer_run_and_records_it(tmp_path, user_assets):
    out = tmp_path / "run"
    assert run_finetune(out, "max_num_steps=1") == 0
    assert run_finetune(out, "max_num_steps=2") == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["max_num_steps"] == 2
    assert (out / "checkpoints" / "step_2" / "trainer").is_dir()


def test_a_foreign_config_yaml_is_left_alone(tmp_path, user_assets, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("trainer: {epochs: 3}\n")  # another tool's file
    assert run_finetune(out, "max_num_steps=1") == 1
    assert "is not a config of this command (it has 'trainer')" in one_error_line(capsys)
    assert (out / "config.yaml").read_text() == "trainer: {epochs: 3}\n"


def test_fast_settings_are_what_the_trained_run_recorded(trained):
    out, _ = trained  # guards the fixture: the refusals above compare against these
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    for item in FAST:
        key, value = item.split("=")
        assert recorded[key] == yaml.safe_load(value)
