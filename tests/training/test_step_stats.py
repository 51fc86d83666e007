"""Published throughput is steady state: warm-up steps (compilation, allocation)
are reported apart as `warmup_s`; `torch_compile=auto` follows the device."""

import logging
import time
from types import SimpleNamespace

import torch

from ft.gang import setup_gangs
from ft.training.compile_choice import resolve_compile
from ft.training.step_stats import StepStats, publish_stats


def _step(stats: StepStats, *, seconds: float, tokens: int = 100) -> None:
    time.sleep(seconds)
    stats.count(SimpleNamespace(num_target_tokens=tokens, num_tokens=tokens, tokens_BT=torch.zeros(tokens),
                                num_examples=1))
    stats.loss_sum += 1.0
    stats.finish_step()


def _publish(stats: StepStats) -> dict:
    gangs = setup_gangs(device="cpu")
    return publish_stats(stats, gangs, lr=1.0, peak_tflops=1.0, flops_per_token=1, epoch=0)


def test_first_window_excludes_the_warmup():
    stats = StepStats.zero(torch.device("cpu"), warmup_steps=2)
    _step(stats, seconds=0.3)  # "compilation"
    _step(stats, seconds=0.0)
    for _ in range(3):
        _step(stats, seconds=0.02)
    values = _publish(stats)
    # 300 tokens over ~0.06 s of steady steps, not 500 over ~0.36 s.
    assert values["tokens_per_s"] > 300 / 0.2
    assert values["warmup_s"] >= 0.3
    assert values["elapsed_s"] >= values["warmup_s"] + 0.06
    assert values["loss"] == 5 / 500
    assert "mfu" in values


def test_a_window_of_only_warmup_publishes_no_throughput():
    stats = StepStats.zero(torch.device("cpu"), warmup_steps=2)
    _step(stats, seconds=0.0)
    values = _publish(stats)
    assert "tokens_per_s" not in values and "mfu" not in values
    assert values["warmup_s"] == values["elapsed_s"]


def test_later_windows_have_no_warmup():
    stats = StepStats.zero(torch.device("cpu"))
    _step(stats, seconds=0.0)
    values = _publish(stats)
    assert "warmup_s" not in values and "tokens_per_s" in values


def test_compile_auto_follows_the_device(caplog):
    with caplog.at_level(logging.INFO, logger="ft"):
        assert resolve_compile("auto", "cuda") is True
        assert resolve_compile("auto", "cpu") is False
        assert resolve_compile(True, "cpu") is True
        assert resolve_compile(False, "cuda") is False
    lines = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(lines) == 4
    assert "on (torch_compile=auto on cuda)" in lines[0] and "off (torch_compile=auto on cpu)" in lines[1]
    assert "set torch_compile=true" in lines[3]
