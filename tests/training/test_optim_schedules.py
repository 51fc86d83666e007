"""Learning-rate schedules: the registered shapes, and a clear error for an unknown one."""

import math

import pytest
import torch

from ft.errors import ConfigError
from ft.training.optim import LR_SCHEDULES, build_scheduler, lr_multiplier


def _curve(schedule, steps=10, warmup=2, final=0.1):
    return [lr_multiplier(s, schedule=schedule, warmup_steps=warmup, max_num_steps=steps, final_lr_scale=final)
            for s in range(steps)]


def test_registered_schedules():
    assert LR_SCHEDULES.names() == ["constant", "cosine", "linear"]


def test_warmup_then_shape():
    for name in LR_SCHEDULES:
        curve = _curve(name)
        assert curve[:2] == [0.5, 1.0]
    assert _curve("constant")[2:] == [1.0] * 8
    linear = _curve("linear")
    assert linear[2] == 1.0 and math.isclose(linear[-1], 1.0 - 0.9 * 7 / 8)
    cosine = _curve("cosine")
    assert cosine[2] == 1.0 and all(a >= b for a, b in zip(cosine[2:], cosine[3:]))
    assert math.isclose(lr_multiplier(8, schedule="cosine", warmup_steps=0, max_num_steps=8, final_lr_scale=0.1), 0.1)


def test_unknown_schedule_names_the_key_and_the_closest():
    with pytest.raises(ConfigError) as info:
        lr_multiplier(0, schedule="linaer", warmup_steps=0, max_num_steps=10, final_lr_scale=0.1)
    assert str(info.value) == (
        "config key 'lr_schedule': unknown lr schedule 'linaer' (did you mean 'linear'?); "
        "registered: constant, cosine, linear"
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="unknown lr schedule 'step'"):  # even during warm-up
        build_scheduler(optimizer, schedule="step", warmup_steps=5, max_num_steps=10, final_lr_scale=0.1)
