"""`ft lm preference_finetune` with `lora.enabled=true` on the tiny default model (CPU, float32):
the DPO reference is the base (the adapters start at B=0), the base weights are never
touched, and the checkpoint holds a PEFT adapter that PEFT loads on the exported base
with ft's logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ft.cli import main
from ft.lora import training as lora_training
from tests.preference.conftest import one_thread, write_copy_pairs  # noqa: F401  (a fixture)
from tests.recipes.conftest import read_metrics, user_assets  # noqa: F401  (a fixture)

SETTINGS = ["max_seq_len=16", "max_num_tokens=256", "publish_metrics_every_n_steps=1", "warmup_steps=0",
            "dtype=float32", "save_model_dtype=float32", "learning_rate=1e-2", "checkpoint_every_n_steps=100"]
LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8"]


def run(out, dataset, *overrides: str) -> int:
    return main(["lm", "preference_finetune", str(out), "--no-sweep-dir", "--config", f"dataset={dataset}",
                 *SETTINGS, *overrides])


def test_dpo_with_lora_uses_the_base_as_reference_and_exports_a_peft_adapter(tmp_path, user_assets, one_thread,
                                                                             monkeypatch):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from ft.assets import load_card
    from ft.lora.adapter_model import adapter_source, create_model_with_adapter

    pairs = write_copy_pairs(tmp_path / "data" / "train.jsonl", 16)
    # The reference table of a full fine-tuning run is the base model's log-probs.
    full = tmp_path / "full"
    assert run(full, pairs, "max_num_steps=1") == 0

    frozen = {}
    start_lora = lora_training.start_lora

    def start_and_snapshot(model, *args, **kwargs):
        start_lora(model, *args, **kwargs)
        frozen["model"] = model
        frozen["before"] = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    monkeypatch.setattr("ft.recipes.preference_finetune.start_lora", start_and_snapshot)
    out = tmp_path / "lora"
    assert run(out, pairs, *LORA, "max_num_steps=3") == 0

    reference = load_file(out / "reference" / "logprobs.safetensors")
    base_reference = load_file(full / "reference" / "logprobs.safetensors")
    assert reference.keys() == base_reference.keys()
    for key in reference:
        torch.testing.assert_close(reference[key], base_reference[key], rtol=0, atol=1e-6)
    metrics = read_metrics(out)
    assert len(metrics) == 3
    # Step 1 runs the policy before any update: with B=0 it is the reference, bitwise.
    assert metrics[0]["chosen_reward"] == 0.0 and metrics[0]["rejected_reward"] == 0.0, metrics[0]
    assert metrics[-1]["reward_margin"] != 0.0

    model, before = frozen["model"], frozen["before"]
    assert before and all(".lora_" not in name for name in before)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, before[name]), name

    step_dir = out / "checkpoints" / "step_3"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in step_dir.iterdir()}
    assert not (step_dir / "model.safetensors").exists()
    assert json.loads((step_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "ft_tiny"

    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    ft_model = create_model_with_adapter(adapter_source(step_dir), device=torch.device("cpu"), dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(load_card("ft_tiny").path("checkpoint"),
                                                             torch_dtype=torch.float32)
    with torch.no_grad():
        base_logits = base.eval()(tokens).logits
        ft_logits = ft_model.eval()(tokens).float()
        peft_logits = peft.PeftModel.from_pretrained(base, step_dir).eval()(tokens).logits
    assert not torch.allclose(peft_logits, base_logits, atol=1e-3)  # the adapters learned something
    torch.testing.assert_close(peft_logits, ft_logits, rtol=1e-4, atol=1e-4)
