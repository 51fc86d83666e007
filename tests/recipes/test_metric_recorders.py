"""Metric recorders: jsonl always, TensorBoard and W&B (offline) on request."""

import importlib.util
import json

import pytest

from ft.errors import ConfigError
from ft.training.metrics import MetricBag, format_metrics
from tests.recipes.conftest import run_finetune


def test_jsonl_is_always_on_and_resume_drops_later_steps(tmp_path):
    bag = MetricBag(tmp_path, [], wandb_project="ft", config={})
    for step in (1, 2, 3):
        bag.record("train", step, {"loss": 1.0 / step})
    bag.close()
    MetricBag(tmp_path, ["jsonl"], wandb_project="ft", config={}, start_step=2)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics" / "train.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_unknown_recorder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config key 'metric_recorders': unknown metric recorder 'mlflow'; registered: jsonl"):
        MetricBag(tmp_path, ["jsonl", "mlflow"], wandb_project="ft", config={})


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_run_writes_event_files(tmp_path, user_assets):
    out = tmp_path / "run"
    assert run_finetune(out, "max_num_steps=2", "metric_recorders=[jsonl, tensorboard]") == 0
    events = list((out / "tb").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("loss")] == [1, 2]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline(tmp_path, user_assets, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    assert run_finetune(out, "max_num_steps=2", "metric_recorders=[jsonl, wandb]") == 0
    assert list(out.rglob("offline-run-*"))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb installed")
def test_wandb_missing_is_a_clear_error(tmp_path, user_assets, capsys):
    assert run_finetune(tmp_path / "run", "max_num_steps=1", "metric_recorders=[wandb]") == 2
    assert "pip install 'ft[wandb]'" in capsys.readouterr().err


def test_console_line_format():
    line = format_metrics({"loss": 1.23456, "lr": 3e-5, "tokens_per_s": 12345678.0, "examples": 7})
    assert line == "loss=1.235 lr=3.000e-05 tokens_per_s=1.235e+07 examples=7"
