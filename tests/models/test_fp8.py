"""FP8 training (`ft.models.fp8`) without a GPU: which layers are chosen, the errors a
user gets where fp8 cannot run, that fp8=none changes nothing, and, with a stand-in for
torchao, what `convert_to_fp8` asks torchao for. The conversion itself runs on a GPU
(benchmarks/train_throughput.py, variants ft_fp8_*)."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch
from torch import nn

from ft.errors import ConfigError
from ft.gang import setup_gangs, teardown_gangs
from ft.models.fp8 import check_fp8_support, convert_to_fp8, fp8_module_filter
from ft.models.llama.model import Llama, LlamaConfig
from ft.models.parallelize import parallelize_model

# dim 32, 4 heads of 8, kv 2 x 8 = 16, ffn 48: every projection is a multiple of 16
# except ffn_dim=40 below.
CONFIG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)


def _model(config: LlamaConfig = CONFIG) -> Llama:
    model = Llama(config)
    model.init_weights(seed=0)
    return model


def test_filter_keeps_the_output_projection_and_unaligned_layers():
    model = _model(dataclasses.replace(CONFIG, ffn_dim=40))
    chosen = {name for name, m in model.named_modules() if fp8_module_filter(m, name)}
    attention = {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"}
    assert chosen == attention  # lm_head: output projection; gate/up/down: 40 is not a multiple of 16
    assert not fp8_module_filter(model.model.norm, "model.norm")
    assert not fp8_module_filter(nn.Linear(32, 64), "lm_head")
    assert fp8_module_filter(nn.Linear(32, 64), "mlp.up_proj")
    assert not fp8_module_filter(nn.Linear(24, 64), "mlp.up_proj")


def test_unknown_recipe_and_bad_devices_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="'fp8' must be one of none, tensorwise, rowwise, got 'blockwise'"):
        check_fp8_support("blockwise", "cpu")
    with pytest.raises(ConfigError, match="needs a CUDA GPU .* the device is 'cpu'; use fp8=none"):
        check_fp8_support("tensorwise", "cpu")
    # LoRA's float8 base needs torch's float8 matmul only (this torch runs it on CPUs), not torchao.
    check_fp8_support("rowwise", "cpu", lora=True, dtype=torch.float32)
    import ft.lora.float8_base as float8_base

    monkeypatch.setattr(float8_base, "float8_matmul_available", lambda *args: "no kernel")
    with pytest.raises(ConfigError, match=r"fp8=rowwise with lora.enabled=true .* cannot run on 'cpu' with "
                                          r"float32 results \(no kernel\); use fp8=none"):
        check_fp8_support("rowwise", "cpu", lora=True, dtype=torch.float32)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ConfigError, match=r"compute capability >= 8.9\), but NVIDIA A100 has 8.0"):
        check_fp8_support("tensorwise", "cuda")
    check_fp8_support("none", "cpu")  # nothing to check


def test_missing_torchao_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(ConfigError, match="fp8=rowwise needs torchao"):
        check_fp8_support("rowwise", "cuda")


def test_fp8_none_leaves_the_model_unchanged():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [type(m) for m in model.modules()]
    assert convert_to_fp8(model, "none", device="cpu") == []
    gangs = setup_gangs(device="cpu")
    try:
        parallelize_model(model, gangs, fp8="none")
    finally:
        teardown_gangs(gangs)
    assert [type(m) for m in model.modules()] == types_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _FakeFloat8Linear(nn.Linear):
    pass


def _fake_torchao(calls: list) -> types.ModuleType:
    """torchao.float8's API as ft calls it, recording the calls."""

    @dataclasses.dataclass(frozen=True)
    class Float8LinearConfig:
        recipe: str = "tensorwise"
        enable_fsdp_float8_all_gather: bool = False

        @staticmethod
        def from_recipe_name(name):
            return Float8LinearConfig(recipe=name)

    def convert_to_float8_training(module, *, module_filter_fn=None, config=None):
        calls.append(config)
        for name, child in list(module.named_modules()):
            if isinstance(child, nn.Linear) and module_filter_fn(child, name):
                parent_name, _, attr = name.rpartition(".")
                new = _FakeFloat8Linear(child.in_features, child.out_features, bias=False, device="meta")
                new.weight = child.weight
                setattr(module.get_submodule(parent_name), attr, new)
        return module

    fake = types.ModuleType("torchao.float8")
    fake.Float8LinearConfig = Float8LinearConfig
    fake.convert_to_float8_training = convert_to_float8_training
    return fake


@pytest.mark.parametrize("recipe, fsdp, all_gather", [
    ("tensorwise", True, True), ("tensorwise", False, False), ("rowwise", True, False),
])
def test_convert_asks_torchao_for_the_recipe(monkeypatch, recipe, fsdp, all_gather):
    calls: list = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao.float8", _fake_torchao(calls))
    model = _model(dataclasses.replace(CONFIG, tie_embeddings=True))
    names = convert_to_fp8(model, recipe, device="cuda", fsdp_float8_all_gather=fsdp)
    (config,) = calls
    assert config.recipe == recipe
    assert config.enable_fsdp_float8_all_gather is all_gather  # torchao: tensorwise only
    assert len(names) == 2 * 7 and "lm_head" not in names
    assert type(model.lm_head) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.down_proj, _FakeFloat8Linear)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tying untouched
