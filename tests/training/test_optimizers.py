"""The optimizer registry and the per-parameter savers on small modules (CPU, float32)."""

import copy
import sys

import pytest
import torch
from torch import nn

from ft.errors import ConfigError
from ft.training.activation_offloading import ActivationOffloading
from ft.training.memory_model import GIB, MemoryPlan, cheapest_fix, parameter_shapes, predict_memory
from ft.training.optimizer_in_backward import PerParameterOptimizer
from ft.training.optimizers import OPTIMIZERS, OptimizerSettings, build_optimizer, step_in_backward
from ft.training.stochastic_rounding import rounding_generator, stochastic_round_to_bf16


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4))


def data(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(64, 8, generator=generator), torch.randn(64, 4, generator=generator)


def train(model, optimizer, steps: int, *, in_backward: bool = False) -> list[float]:
    dtype = next(model.parameters()).dtype
    x, y = (t.to(dtype) for t in data())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    losses = []
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if in_backward:
            step_in_backward(optimizer, scheduler)
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_in_backward_equals_the_plain_step(name):
    plain, fused = small_model(), small_model()
    settings = OptimizerSettings(name=name, learning_rate=1e-2, weight_decay=0.1)
    train(plain, build_optimizer(plain, settings), 10)
    optimizer = build_optimizer(fused, OptimizerSettings(name=name, learning_rate=1e-2, weight_decay=0.1,
                                                         in_backward=True))
    assert isinstance(optimizer, PerParameterOptimizer)
    train(fused, optimizer, 10, in_backward=True)
    for a, b in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_dropped_model_and_in_backward_optimizer_free_their_memory():
    import gc
    import weakref

    model = small_model()
    optimizer = build_optimizer(model, OptimizerSettings(name="adafactor", learning_rate=1e-2, in_backward=True))
    train(model, optimizer, 2, in_backward=True)
    param = weakref.ref(next(model.parameters()))
    del model, optimizer
    gc.collect()
    # the backward hooks live where the garbage collector cannot see them: they must not keep the model alive
    assert param() is None


def test_in_backward_reports_the_gradient_norm():
    model = small_model()
    x, y = data()
    ((model(x) - y) ** 2).mean().backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    model.zero_grad()
    optimizer = build_optimizer(model, OptimizerSettings(learning_rate=1e-2, in_backward=True))
    ((model(x) - y) ** 2).mean().backward()
    assert all(p.grad is None for p in model.parameters())  # freed as they were stepped
    torch.testing.assert_close(optimizer.grad_norm(), expected)


def test_cpu_offload_equals_the_plain_step_and_keeps_master_weights():
    plain, offloaded = small_model(), small_model()
    settings = OptimizerSettings(learning_rate=1e-2, weight_decay=0.1)
    train(plain, build_optimizer(plain, settings), 5)
    train(offloaded, build_optimizer(offloaded, OptimizerSettings(learning_rate=1e-2, weight_decay=0.1,
                                                                  cpu_offload=True)), 5)
    for a, b in zip(plain.parameters(), offloaded.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    bf16 = small_model().to(torch.bfloat16)
    optimizer = build_optimizer(bf16, OptimizerSettings(learning_rate=1e-2, cpu_offload=True))
    train(bf16, optimizer, 2)
    state = optimizer.state_dict()["state"][0]
    assert state["master_weight"].dtype == torch.float32


def constant_lr_steps(model, optimizer, n: int) -> None:
    x, y = data()
    for _ in range(n):
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()  # in backward: steps nothing, the hooks did
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("settings", [
    dict(name="adamw"), dict(name="adafactor"), dict(name="adamw", in_backward=True),
    dict(name="adafactor", in_backward=True), dict(name="adamw", cpu_offload=True),
])
def test_state_dict_round_trip_resumes_exactly(settings):
    """Through torch.distributed.checkpoint's state-dict API, as CheckpointManager saves and loads."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def make(seed: int = 0):
        model = small_model(seed)
        return model, build_optimizer(model, OptimizerSettings(learning_rate=1e-2, weight_decay=0.1, **settings))

    full, full_optimizer = make()
    constant_lr_steps(full, full_optimizer, 6)

    first, first_optimizer = make()
    constant_lr_steps(first, first_optimizer, 3)
    model_state, optim_state = copy.deepcopy(get_state_dict(first, first_optimizer))
    second, second_optimizer = make(seed=5)
    set_state_dict(second, second_optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    constant_lr_steps(second, second_optimizer, 3)
    for a, b in zip(full.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_stochastic_rounding_is_unbiased_and_deterministic():
    x = torch.full((200_000,), 1.0 + 2**-10, dtype=torch.float32)  # between two bf16 neighbours
    rounded = stochastic_round_to_bf16(x, generator=torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0078125}
    assert abs(rounded.mean().item() - x[0].item()) < 2e-5
    again = stochastic_round_to_bf16(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rounded.bfloat16(), again)
    special = torch.tensor([float("inf"), -float("inf"), 0.0, -2.5])
    assert torch.equal(stochastic_round_to_bf16(special).float(), special)
    assert rounding_generator(torch.device("cpu"), seed=1, index=2, step=3).initial_seed() == \
        rounding_generator(torch.device("cpu"), seed=1, index=2, step=3).initial_seed()


def test_stochastic_rounding_keeps_updates_smaller_than_bf16_resolution():
    """A weight of 1.0 pushed by 1e-4 per step: round to nearest never moves it; stochastic
    rounding moves it by the sum of the steps on average."""
    def run(stochastic: bool) -> float:
        param = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        inner = (lambda groups: torch.optim.SGD(groups, lr=1e-4))
        optimizer = PerParameterOptimizer([{"params": [param]}], inner, stochastic_rounding=stochastic)
        for _ in range(100):
            param.grad = torch.ones_like(param)
            optimizer.step()
        return param.float().mean().item()

    assert run(False) == 1.0
    assert abs(run(True) - (1.0 - 100 * 1e-4)) < 1e-3


@pytest.mark.parametrize("name", ["adamw8bit", "adamw4bit"])
def test_low_bit_optimizers_need_torchao(monkeypatch, name):
    """Without torchao (None in sys.modules makes its import fail, installed or not); with it,
    tests/training/test_low_bit_optimizers.py trains."""
    for module in ("torchao", "torchao.optim", "torchao.prototype", "torchao.prototype.low_bit_optim"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ConfigError, match=f"'optimizer': {name} needs torchao.*pip install torchao.*optimizer=adamw"):
        build_optimizer(small_model(), OptimizerSettings(name=name, learning_rate=1e-3))


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ConfigError, match="adafactor, adamw, adamw4bit, adamw8bit"):
        OPTIMIZERS.get("adam", key="optimizer")


def test_activation_offloading_hooks_give_the_same_gradients():
    model, offloaded = small_model(), small_model()
    x, y = data()
    ((model(x) - y) ** 2).mean().backward()
    hooks = ActivationOffloading(min_bytes=0)
    with hooks:
        loss = ((offloaded(x) - y) ** 2).mean()
    loss.backward()
    assert hooks.offloaded_bytes > 0
    for a, b in zip(model.parameters(), offloaded.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_memory_model_matches_the_arithmetic_of_an_8b_model():
    from ft.models.family import find_arch

    _, config = find_arch("llama3_1_8b")
    shapes = parameter_shapes(config)
    pure = predict_memory(MemoryPlan(model_config=config, mixed_precision=False,
                                     activation_checkpointing="selective"), shapes)
    assert abs(pure.weights / GIB - 14.96) < 0.01 and abs(pure.optimizer_states / GIB - 29.92) < 0.01
    saver = MemoryPlan(model_config=config, mixed_precision=False, optimizer="adafactor", optimizer_in_backward=True,
                       activation_checkpointing="full", loss_chunk_size=256)
    small = predict_memory(saver, shapes)
    assert small.optimizer_states < 0.05 * GIB and small.gradients < 2.5 * GIB and small.peak < pure.peak / 2
    label, fixed = cheapest_fix(MemoryPlan(model_config=config), 24 * GIB, shapes)
    assert "optimizer_in_backward=true" in label and fixed.peak_with_slack <= 24 * GIB


def test_stochastic_rounding_in_blocks_rounds_every_element_and_is_deterministic():
    from ft.training.stochastic_rounding import stochastic_round_into

    x = torch.randn(37, 11, dtype=torch.float32)
    out, again = torch.empty_like(x, dtype=torch.bfloat16), torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_into(out, x, generator=torch.Generator().manual_seed(1), block_numel=50)
    stochastic_round_into(again, x, generator=torch.Generator().manual_seed(1), block_numel=50)
    assert torch.equal(out, again)
    # each element lands on one of its two bf16 neighbours (within one ulp), not always the nearest
    assert torch.all((out.float() - x).abs() < x.abs() * 2**-7)
    assert not torch.equal(out, x.to(torch.bfloat16))
