"""Shared helpers for recipe tests: run `ft` in-process on the embedded default."""

import json
from pathlib import Path

import pytest

from ft.cli import main

# Small and fast: the tiny default model on short rows.
FAST = ["max_seq_len=128", "max_num_tokens=256", "publish_metrics_every_n_steps=1", "warmup_steps=2"]


def run_finetune(out: Path, *overrides: str) -> int:
    return main(["lm", "instruction_finetune", str(out), "--no-sweep-dir", "--config", *FAST, *overrides])


def read_metrics(out: Path, split: str = "train") -> list[dict]:
    return [json.loads(line) for line in (out / "metrics" / f"{split}.jsonl").read_text().splitlines()]


@pytest.fixture
def user_assets(tmp_path, monkeypatch):
    """An empty user card directory, so no card on this machine leaks into a test."""
    directory = tmp_path / "user_assets"
    directory.mkdir()
    monkeypatch.setenv("FT_USER_ASSET_DIR", str(directory))
    return directory
