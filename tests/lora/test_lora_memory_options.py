"""LoRA with activation checkpointing and torch.compile on one CPU process (float32):
recomputing activations gives the same loss curve and adapters bitwise; compiled
blocks train like eager ones."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.recipes.conftest import read_metrics, run_finetune, user_assets  # noqa: F401  (a fixture)

LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8", "dtype=float32", "save_model_dtype=float32",
        "learning_rate=1e-2", "torch_compile=false"]


def adapter(out, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step_{step}" / "adapter_model.safetensors")


def test_lora_with_full_activation_checkpointing_trains_like_without(tmp_path, user_assets):
    plain, checkpointed = tmp_path / "plain", tmp_path / "ac"
    assert run_finetune(plain, *LORA, "max_num_steps=3") == 0
    assert run_finetune(checkpointed, *LORA, "max_num_steps=3", "activation_checkpointing=full") == 0
    assert [m["loss"] for m in read_metrics(checkpointed)] == [m["loss"] for m in read_metrics(plain)]
    ours, theirs = adapter(checkpointed, 3), adapter(plain, 3)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
def test_lora_with_torch_compile_trains_like_eager(tmp_path, user_assets):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert run_finetune(eager, *LORA, "max_num_steps=2") == 0
    assert run_finetune(compiled, *LORA, "max_num_steps=2", "torch_compile=true") == 0
    torch.testing.assert_close([m["loss"] for m in read_metrics(compiled)], [m["loss"] for m in read_metrics(eager)],
                               rtol=1e-4, atol=1e-5)
    ours, theirs = adapter(compiled, 2), adapter(eager, 2)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-3, atol=1e-5, msg=key)


@pytest.mark.parametrize("mixed, adapter_dtype", [("true", torch.float32), ("false", torch.bfloat16)])
def test_adapters_are_float32_master_weights_only_under_mixed_precision(tmp_path, user_assets, mixed, adapter_dtype):
    from torch.distributed.checkpoint import FileSystemReader

    out = tmp_path / "run"
    settings = [s for s in LORA if not s.startswith("dtype=")]
    assert run_finetune(out, *settings, "dtype=bfloat16", f"mixed_precision={mixed}", "max_num_steps=1") == 0
    saved = FileSystemReader(str(out / "checkpoints" / "step_1" / "trainer")).read_metadata().state_dict_metadata
    adapters = {k: v.properties.dtype for k, v in saved.items() if k.startswith("model.") and ".lora_" in k}
    assert adapters and set(adapters.values()) == {adapter_dtype}  # and AdamW's states follow them
    states = {v.properties.dtype for k, v in saved.items() if k.startswith("optimizer.state.") and k.endswith("exp_avg")}
    assert states == {adapter_dtype}
