"""Metric recorders: jsonl always on, registered names, a clear error for an unknown one."""

import json

import pytest

from ft.errors import ConfigError
from ft.training.metrics import METRIC_RECORDERS, JsonlRecorder, MetricBag


def test_registered_recorders():
    assert METRIC_RECORDERS.names() == ["jsonl", "tensorboard", "wandb"]


def test_jsonl_is_always_on_and_listed_once(tmp_path):
    for names in ([], ["jsonl"], ["jsonl", "jsonl"]):
        bag = MetricBag(tmp_path, names, wandb_project="p", config={})
        assert [type(r) for r in bag.recorders] == [JsonlRecorder]
        bag.close()
    bag = MetricBag(tmp_path / "run", [], wandb_project="p", config={})
    bag.record("train", 1, {"loss": 2.0})
    bag.close()
    assert json.loads((tmp_path / "run" / "metrics" / "train.jsonl").read_text()) == {"step": 1, "loss": 2.0}


def test_unknown_recorder_names_the_key_and_the_closest(tmp_path):
    with pytest.raises(ConfigError) as info:
        MetricBag(tmp_path, ["jsonl", "wandbb"], wandb_project="p", config={})
    assert str(info.value) == (
        "config key 'metric_recorders': unknown metric recorder 'wandbb' (did you mean 'wandb'?); "
        "registered: jsonl, tensorboard, wandb"
    )
    assert not (tmp_path / "metrics").exists()  # checked before any recorder starts
