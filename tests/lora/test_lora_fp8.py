"""LoRA on a float8 frozen base (`fp8=tensorwise|rowwise` with `lora.enabled=true`,
`ft.lora.float8_base`): the matmuls are exactly the products of their float8 operands,
the backward computes the input gradient only, compile changes nothing, and through
the recipe (CPU: torch runs float8 matmuls there) the loss stays with the bf16 base's,
the run resumes bitwise and the merged export is merged into the checkpoint's weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ft.errors import ConfigError
from ft.lora import LoraConfig
from ft.lora.float8_base import E4M3, E5M2, float8_linear, float8_matmul_available, quantize, quantize_weight
from ft.lora.layers import LoraLinear, float8_frozen_linears
from ft.lora.training import check_lora_run
from tests.lora.lora_runs import (
    LORA,
    assert_merged_into_checkpoint_weights,
    assert_peft_adapter_matches_merged_export,
    assert_stopped_run_resumes_exactly,
    assert_trainer_state_holds_only_adapters,
)
from tests.recipes.conftest import read_metrics, run_finetune, user_assets  # noqa: F401  (a fixture)

SCALINGS = ["tensorwise", "rowwise"]

pytestmark = pytest.mark.skipif(float8_matmul_available("cpu", "rowwise", torch.float32) is not None
                                or float8_matmul_available("cpu", "tensorwise", torch.float32) is not None,
                                reason="this torch runs no float8 matmul on CPUs (covered on the GPU)")


def _dequantized(t: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> torch.Tensor:
    q, scale = quantize(t, dtype, rowwise=rowwise)
    return q.double() * scale.double()


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("_scaled_mm", "mm", "addmm", "bmm", "matmul"):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scaling", SCALINGS)
def test_float8_linear_is_the_product_of_its_float8_operands_and_skips_the_weight_gradient(scaling):
    rowwise = scaling == "rowwise"
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=generator) * 0.05
    x = torch.randn(2, 8, 64, generator=generator, requires_grad=True)
    grad_y = torch.randn(2, 8, 48, generator=generator)
    weight_q, weight_scale = quantize_weight(weight, rowwise=rowwise)
    assert weight_q.dtype == E4M3 and weight_scale.shape == ((1, 48) if rowwise else ())

    y = float8_linear(x, weight_q, weight_scale, None, rowwise=rowwise, out_dtype=torch.float32)
    # The same float8 values multiplied in float64: only the float32 accumulation differs.
    w = weight_q.double() * weight_scale.double().reshape(-1, 1)
    expected = _dequantized(x.detach().reshape(-1, 64), E4M3, rowwise) @ w.t()
    torch.testing.assert_close(y.reshape(-1, 48).double(), expected, rtol=1e-5, atol=1e-6)

    with _CountMatmuls() as counted:
        y.backward(grad_y)
    assert counted.ops == ["_scaled_mm"]  # the input gradient; no weight gradient is computed
    g = grad_y.reshape(-1, 48).double()
    if rowwise:  # the weight's row scales folded into dy before it is cast
        expected_dx = _dequantized(g * weight_scale.double(), E4M3, True) @ weight_q.double()
    else:
        expected_dx = _dequantized(g, E5M2, False) @ w
    torch.testing.assert_close(x.grad.reshape(-1, 64).double(), expected_dx, rtol=1e-5, atol=1e-6)

    # And float8's error against full precision is what its 3-bit mantissa allows.
    reference = F.linear(x.detach(), weight)
    assert (y - reference).norm() / reference.norm() < 0.06


def _lora_linear(dtype=torch.float32) -> LoraLinear:
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48, bias=True, dtype=dtype)
    module = LoraLinear.wrap(base, rank=4, alpha=8, dropout=0.0, dtype=dtype)
    module.weight.requires_grad_(False)
    module.bias.requires_grad_(False)
    torch.nn.init.zeros_(module.lora_B.weight)  # PEFT's start
    return module


@pytest.mark.parametrize("scaling", SCALINGS)
def test_a_float8_lora_linear_adds_the_adapter_to_the_float8_base_and_compiles_alike(scaling):
    module = _lora_linear()
    full_weight = module.weight.detach().clone()
    holder = torch.nn.Sequential(module)
    assert float8_frozen_linears(holder, scaling, dtype=torch.float32) == (1, [])
    assert module.weight.dtype == E4M3 and not module.weight.requires_grad
    assert "weight_scale" not in module.state_dict()  # a derived buffer, never saved
    x = torch.randn(3, 5, 64)

    # B = 0: the float8 base's output, bias added in full precision.
    base_only = float8_linear(x, module.weight, module.weight_scale, module.bias, rowwise=scaling == "rowwise",
                              out_dtype=torch.float32)
    torch.testing.assert_close(module(x), base_only, rtol=0, atol=0)
    assert (module(x) - F.linear(x, full_weight, module.bias)).abs().max() > 0  # it is float8

    torch.nn.init.normal_(module.lora_B.weight)
    eager_x = x.clone().requires_grad_()
    eager = module(eager_x)
    eager.square().sum().backward()
    eager_grads = [eager_x.grad, module.lora_A.weight.grad.clone(), module.lora_B.weight.grad.clone()]
    module.zero_grad()
    compiled_x = x.clone().requires_grad_()
    compiled = torch.compile(module, fullgraph=True)(compiled_x)
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for got, want in zip([compiled_x.grad, module.lora_A.weight.grad, module.lora_B.weight.grad], eager_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_unaligned_linears_stay_in_their_dtype():
    holder = torch.nn.Sequential(_lora_linear(), LoraLinear.wrap(torch.nn.Linear(24, 64), rank=2, alpha=2,
                                                                  dropout=0.0, dtype=torch.float32))
    holder[1].weight.requires_grad_(False)
    assert float8_frozen_linears(holder, "tensorwise", dtype=torch.float32) == (1, ["1"])
    assert holder[1].weight.dtype == torch.float32 and holder[1].float8_scaling is None
    assert float8_frozen_linears(holder, "tensorwise", dtype=torch.float32) == (0, ["1"])  # cast once


FP8_LORA = [*LORA, "fp8=rowwise"]


def test_float8_base_loss_follows_the_full_precision_base_and_a_run_resumes_exactly(
        tmp_path, user_assets, monkeypatch):
    settings = [*FP8_LORA, "max_num_steps=6", "checkpoint_every_n_steps=100"]
    full = tmp_path / "full"
    assert run_finetune(full, *settings) == 0
    losses = [m["loss"] for m in read_metrics(full)]
    plain = tmp_path / "plain"
    assert run_finetune(plain, *LORA, "max_num_steps=6", "checkpoint_every_n_steps=100") == 0
    plain_losses = [m["loss"] for m in read_metrics(plain)]
    assert losses[-1] < losses[0]
    # float8 changes the logits, a little: within 1% of the full-precision base at every step.
    assert losses != plain_losses
    for got, want in zip(losses, plain_losses):
        assert abs(got - want) <= 0.01 * want, (losses, plain_losses)

    assert_stopped_run_resumes_exactly(full, tmp_path / "resumed", settings, monkeypatch)
    assert_trainer_state_holds_only_adapters(full / "checkpoints" / "step_6")


def test_float8_base_exports_merge_into_the_checkpoint_weights(tmp_path, user_assets):
    pytest.importorskip("peft")
    from ft.assets import load_card

    out = tmp_path / "run"
    assert run_finetune(out, *FP8_LORA, "max_num_steps=3", "lora.export_merged=true") == 0
    step_dir = out / "checkpoints" / "step_3"
    base_dir = load_card("ft_tiny").path("checkpoint")
    assert_merged_into_checkpoint_weights(step_dir, base_dir)
    assert_peft_adapter_matches_merged_export(step_dir, base_dir)


SOURCE = SimpleNamespace(checkpoint=Path("base"), description="base")


@pytest.mark.parametrize("layout, message", [
    ({"dp_size": 2, "tp_size": 1}, "runs on one process .* this run has dp_size=2"),
    ({"dp_size": 1, "tp_size": 2}, "this run has tp_size=2"),
    ({"dp_size": 1, "tp_size": 1, "pp_size": 2}, "this run has pp_size=2"),
])
def test_float8_base_refuses_more_than_one_process(layout, message):
    with pytest.raises(ConfigError, match=message):
        check_lora_run(LoraConfig(enabled=True), source=SOURCE, fp8="tensorwise", **layout)
    check_lora_run(LoraConfig(enabled=True), source=SOURCE, fp8="tensorwise", dp_size=1, tp_size=1)


@pytest.mark.parametrize("layout, message", [
    ({"tensor_parallel_size": 2}, "this run has tensor_parallel_size=2"),
    ({"pipeline_parallel_size": 2, "gradient_accumulation": 2}, "this run has pipeline_parallel_size=2"),
])
def test_the_config_refuses_a_sharded_float8_base_before_any_process_starts(layout, message):
    from ft.recipes.instruction_finetune_config import InstructionFinetuneConfig

    with pytest.raises(ConfigError, match=message):
        InstructionFinetuneConfig(lora=LoraConfig(enabled=True), fp8="rowwise", **layout).check()
    InstructionFinetuneConfig(lora=LoraConfig(enabled=True), **layout).check()  # bf16 base: fine


def test_float8_base_and_nf4_are_one_or_the_other(tmp_path, user_assets):
    pytest.importorskip("torchao")
    with pytest.raises(ConfigError, match="lora.base_quantization=nf4 quantizes it too; choose one"):
        check_lora_run(LoraConfig(enabled=True, base_quantization="nf4"), source=SOURCE, fp8="rowwise",
                       dp_size=1, tp_size=1)
    # Through the CLI: a clear error, non-zero, no checkpoint written.
    out = tmp_path / "run"
    assert run_finetune(out, *FP8_LORA, "lora.base_quantization=nf4", "max_num_steps=2") != 0
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_memory_model_counts_the_float8_base_at_one_byte():
    from ft.models import find_arch
    from ft.training.memory_model import MemoryPlan, parameter_shapes, predict_memory

    config = find_arch("llama3_1_8b")[1]
    plan = MemoryPlan(model_config=config, mixed_precision=False, activation_checkpointing="full",
                      max_num_tokens=4096, lora_rank=16)
    shapes = parameter_shapes(config)
    block_linears = sum(torch.Size(s).numel() for name, s in shapes.items() if ".layers." in f".{name}" and len(s) == 2)
    bf16 = predict_memory(plan).weights
    fp8 = predict_memory(dataclasses.replace(plan, lora_fp8=True)).weights
    assert bf16 - fp8 == pytest.approx(block_linears * (2 - 1))
