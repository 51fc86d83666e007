"""Optimizer and schedule values torch rejects late or accepts and trains wrongly
(a negative max_grad_norm flips every gradient): one line naming the key, exit 2,
nothing written into OUT."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.recipes.conftest import run_finetune

BAD = [
    ("learning_rate=-1e-3", "config key 'learning_rate' must be a finite number >= 0, got -0.001"),
    ("learning_rate=.nan", "config key 'learning_rate' must be a finite number >= 0, got nan"),
    ("betas=[0.9, 1.0]", "config key 'betas[1]' must be in [0, 1), got 1.0"),
    ("betas=[-0.1, 0.95]", "config key 'betas[0]' must be in [0, 1), got -0.1"),
    ("eps=0", "config key 'eps' must be a finite number > 0, got 0.0"),
    ("max_grad_norm=-1", "config key 'max_grad_norm' must be a finite number > 0, or null for no clipping, got -1.0"),
    ("final_lr_scale=-0.5", "config key 'final_lr_scale' must be a finite number >= 0, got -0.5"),
    ("weight_decay=.nan", "config key 'weight_decay' must be a finite number >= 0, got nan"),
    ("warmup_steps=-3", "config key 'warmup_steps' must be at least 0, got -3"),
]


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FT_USER_ASSET_DIR", str(tmp_path_factory.mktemp("no_user_cards")))
        out = tmp_path_factory.mktemp("trained") / "run"
        assert run_finetune(out, "max_num_steps=1") == 0
    return out


@pytest.mark.parametrize("override, message", BAD, ids=[o for o, _ in BAD])
def test_bad_value_is_one_line_and_writes_nothing(trained_once, user_assets, capsys, override, message):
    before = snapshot(trained_once)
    assert run_finetune(trained_once, override) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert line == f"error: {message}"
    assert snapshot(trained_once) == before


def test_no_clipping_is_allowed(tmp_path, user_assets):
    assert run_finetune(tmp_path / "run", "max_grad_norm=null", "max_num_steps=1") == 0
