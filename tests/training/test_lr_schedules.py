"""The learning-rate multiplier at known steps: linear warm-up, then each schedule's
value at its start, middle and end, held at the end past `max_num_steps`; the
scheduler applies exactly that multiplier; an unknown schedule name is an error."""

from __future__ import annotations

import math

import pytest
import torch

from ft.errors import ConfigError
from ft.training.optim import build_scheduler, lr_multiplier

SCHEDULES = ["constant", "linear", "cosine"]


def mult(step: int, schedule: str, *, warmup: int = 4, max_steps: int = 14, final: float = 0.1) -> float:
    return lr_multiplier(step, schedule=schedule, warmup_steps=warmup, max_num_steps=max_steps, final_lr_scale=final)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_warmup_is_linear_to_one_then_the_schedule_starts_at_one(schedule):
    # Step s of warm-up (0-based) runs at (s + 1) / warmup: never at 0.
    assert [mult(s, schedule) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert mult(4, schedule) == pytest.approx(1.0)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_no_warmup_starts_at_full_rate(schedule):
    assert mult(0, schedule, warmup=0) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "step, constant, linear, cosine",
    [
        # warmup 4, max_num_steps 14: 10 decay steps, final_lr_scale 0.1.
        (4, 1.0, 1.0, 1.0),  # progress 0
        (6, 1.0, 1.0 - 0.9 * 0.2, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2))),
        (9, 1.0, 0.55, 0.55),  # half way: linear and cosine agree
        (11, 1.0, 1.0 - 0.9 * 0.7, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.7))),
        (14, 1.0, 0.1, 0.1),  # progress 1: the final scale
    ],
)
def test_schedule_values_at_known_steps(step, constant, linear, cosine):
    assert mult(step, "constant") == pytest.approx(constant)
    assert mult(step, "linear") == pytest.approx(linear)
    assert mult(step, "cosine") == pytest.approx(cosine)


@pytest.mark.parametrize("schedule, end", [("constant", 1.0), ("linear", 0.1), ("cosine", 0.1)])
def test_past_the_end_the_rate_stays_at_the_final_value(schedule, end):
    for step in (14, 15, 100, 10_000):
        assert mult(step, schedule) == pytest.approx(end)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decay_is_monotone_and_final_scale_is_respected(schedule):
    for final in (0.0, 0.1, 1.0):
        curve = [mult(s, schedule, final=final) for s in range(4, 15)]
        assert all(a >= b - 1e-12 for a, b in zip(curve, curve[1:]))
        assert curve[0] == pytest.approx(1.0) and curve[-1] == pytest.approx(final)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_warmup_as_long_as_the_run_goes_straight_to_the_final_value(schedule):
    # No decay steps left: one step after warm-up reaches the end of the schedule.
    assert mult(3, schedule, warmup=4, max_steps=4) == pytest.approx(1.0)
    assert mult(4, schedule, warmup=4, max_steps=4) == pytest.approx(1.0)
    assert mult(5, schedule, warmup=4, max_steps=4) == pytest.approx(0.1)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_scheduler_sets_base_lr_times_the_multiplier_on_every_group(schedule):
    base = 0.5
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr": 2 * base}], lr=base)
    scheduler = build_scheduler(optimizer, schedule=schedule, warmup_steps=4, max_num_steps=14, final_lr_scale=0.1)
    for step in range(20):
        # The rate in force for optimizer step `step` (the recipe steps, then the scheduler).
        expected = mult(step, schedule)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(base * expected), step
        assert optimizer.param_groups[1]["lr"] == pytest.approx(2 * base * expected), step
        optimizer.step()
        scheduler.step()


def test_scheduler_state_round_trips_for_resume():
    def make():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return optimizer, build_scheduler(optimizer, schedule="cosine", warmup_steps=2, max_num_steps=10, final_lr_scale=0.0)

    optimizer, scheduler = make()
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    resumed_optimizer, resumed = make()
    resumed.load_state_dict(scheduler.state_dict())
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    for _ in range(3):
        for opt, sched in ((optimizer, scheduler), (resumed_optimizer, resumed)):
            opt.step()
            sched.step()
        assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(mult(8, "cosine", warmup=2, max_steps=10, final=0.0))


def test_unknown_schedule_is_an_error_naming_it():
    # After warm-up, so the name is looked up whatever the implementation does during warm-up.
    # ValueError or ft's ConfigError: both mean "a user mistake, here is the name".
    with pytest.raises((ConfigError, ValueError), match="unknown lr schedule 'cosin'"):
        mult(10, "cosin")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises((ConfigError, ValueError), match="unknown lr schedule 'step'"):
        build_scheduler(optimizer, schedule="step", warmup_steps=0, max_num_steps=10, final_lr_scale=0.1)
