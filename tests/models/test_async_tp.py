"""async_tensor_parallel: what it needs is checked before any work, and on a TP run it
turns on torch's micro-pipeline TP pass with symmetric memory for the TP group (the
overlap itself needs several CUDA GPUs and is measured there, not here)."""

from __future__ import annotations

import pytest

from ft.errors import ConfigError
from ft.models.async_tp import check_async_tp, enable_async_tp
from tests.recipes.conftest import run_finetune, user_assets  # noqa: F401  (a fixture)

OK = dict(enabled=True, device_type="cuda", compiled=True, tp_size=2, sequence_parallel=True)


@pytest.mark.parametrize("change, message", [
    ({"tp_size": 1}, "needs tensor_parallel_size > 1 and sequence_parallel=true"),
    ({"sequence_parallel": False}, "needs tensor_parallel_size > 1 and sequence_parallel=true"),
    ({"device_type": "cpu"}, "runs on CUDA GPUs only (device is cpu"),
    ({"compiled": False}, "is a torch.compile pass: set torch_compile=true"),
])
def test_what_async_tp_needs_is_named(change, message):
    check_async_tp(**OK)  # everything it needs
    check_async_tp(**{**OK, **change, "enabled": False})  # off: nothing is checked
    with pytest.raises(ConfigError, match="config key 'async_tensor_parallel'") as error:
        check_async_tp(**{**OK, **change})
    assert message in str(error.value)


def test_enabling_turns_on_the_pass_and_symmetric_memory_for_the_tp_group(monkeypatch):
    import torch._inductor.config as inductor_config
    import torch.distributed._symmetric_memory as symmetric_memory

    groups = []
    monkeypatch.setattr(inductor_config, "_micro_pipeline_tp", False)
    monkeypatch.setattr(symmetric_memory, "enable_symm_mem_for_group", groups.append)
    enable_async_tp("tp_group_7")
    assert inductor_config._micro_pipeline_tp is True and groups == ["tp_group_7"]


def test_the_recipe_refuses_it_on_a_cpu_before_any_work(tmp_path, user_assets, capsys):
    assert run_finetune(tmp_path / "run", "async_tensor_parallel=true") == 2
    err = capsys.readouterr().err
    assert "config key 'async_tensor_parallel' needs tensor_parallel_size > 1" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
