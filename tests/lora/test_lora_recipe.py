"""`ft lm instruction_finetune` with `lora.enabled=true` on the embedded default (CPU, float32):
only adapters train and are saved, a stopped run resumes bitwise, PEFT and
transformers load the checkpoint's exports with the same logits, and LoRA and full
fine-tuning checkpoints refuse to resume each other."""

from __future__ import annotations

import json

import pytest
import torch

from ft.lora import LoraConfig, apply_lora, init_lora_weights
from ft.models import build_model
from ft.training.optim import build_optimizer
from tests.lora.lora_runs import (
    assert_peft_adapter_matches_merged_export,
    assert_stopped_run_resumes_exactly,
    assert_trainer_state_holds_only_adapters,
)
from tests.recipes.conftest import read_metrics, run_finetune, user_assets  # noqa: F401  (a fixture)

LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8", "dtype=float32", "save_model_dtype=float32",
        "learning_rate=1e-2"]


def test_frozen_base_is_unchanged_and_has_no_optimizer_state():
    model = build_model("llama_debug", device="cpu", seed=0)
    apply_lora(model, LoraConfig(enabled=True, rank=4), base_dtype=torch.float32)
    init_lora_weights(model, seed=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = build_optimizer(model, learning_rate=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(tokens).float().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, frozen[name]), name
    with_state = {id(p) for p in optimizer.state}
    assert all(id(p) not in with_state for n, p in model.named_parameters() if not p.requires_grad)
    assert any(".lora_B." in n and p.abs().sum() > 0 for n, p in model.named_parameters())


def test_lora_run_saves_only_adapters_and_resumes_exactly(tmp_path, user_assets, monkeypatch):
    settings = [*LORA, "max_num_steps=6", "checkpoint_every_n_steps=100"]
    full = tmp_path / "full"
    assert run_finetune(full, *settings) == 0
    losses = [m["loss"] for m in read_metrics(full)]
    assert losses[-1] < losses[0]

    a = assert_stopped_run_resumes_exactly(full, tmp_path / "resumed", settings, monkeypatch)

    step_dir = full / "checkpoints" / "step_6"
    assert sorted(p.name for p in step_dir.glob("*.safetensors")) == ["adapter_model.safetensors"]
    assert all(k.startswith("base_model.model.model.layers.") and (".lora_A." in k or ".lora_B." in k) for k in a)
    # The trainer state is the adapters and their optimizer state, not the base.
    trainer_bytes = sum(f.stat().st_size for f in (step_dir / "trainer").glob("*.distcp"))
    assert trainer_bytes < 4 * 3 * sum(t.numel() * 4 for t in a.values())
    assert_trainer_state_holds_only_adapters(step_dir)


def test_peft_and_transformers_load_the_checkpoint_exports(tmp_path, user_assets):
    pytest.importorskip("peft")
    from ft.assets import load_card

    out = tmp_path / "run"
    assert run_finetune(out, *LORA, "max_num_steps=3", "lora.export_merged=true") == 0
    step_dir = out / "checkpoints" / "step_3"
    assert json.loads((step_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "ft_tiny"
    base_dir = load_card("ft_tiny").path("checkpoint")
    assert_peft_adapter_matches_merged_export(step_dir, base_dir)


def test_lora_and_full_runs_do_not_resume_each_other(tmp_path, user_assets):
    full = tmp_path / "full"
    assert run_finetune(full, "dtype=float32", "max_num_steps=2") == 0
    assert run_finetune(full, *LORA, "max_num_steps=4") != 0
    lora = tmp_path / "lora"
    assert run_finetune(lora, *LORA, "max_num_steps=2") == 0
    assert run_finetune(lora, "dtype=float32", "max_num_steps=4") != 0
    assert run_finetune(lora, *LORA, "lora.rank=8", "max_num_steps=4") != 0
    assert sorted(p.name for p in (lora / "checkpoints").iterdir()) == ["step_2"]


@pytest.mark.parametrize("override, message", [
    ("lora.rank=0", "'lora.rank' must be at least 1"),
    ("lora.target_modules=[q_proj,qkv]", "'qkv' is not a linear layer.*valid names: down_proj"),
])
def test_bad_lora_settings_fail_with_a_message(tmp_path, user_assets, capsys, override, message):
    assert run_finetune(tmp_path / "run", *LORA, override, "max_num_steps=2") != 0
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run" / "checkpoints").exists()
