"""A tiny LoRA run through the recipe, shared by the tests that read its adapter."""

from __future__ import annotations

import pytest

from tests.recipes.conftest import read_metrics, run_finetune
from tests.recipes.test_instruction_finetune import stop_after

LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8", "dtype=float32", "save_model_dtype=float32",
        "learning_rate=1e-2"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One LoRA run (3 steps, merged export on) per test module, with no user cards,
    as `user_assets` gives the tests."""
    root = tmp_path_factory.mktemp("lora_run")
    (root / "cards").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FT_USER_ASSET_DIR", str(root / "cards"))
        assert run_finetune(root / "run", *LORA, "max_num_steps=3", "lora.export_merged=true") == 0
    return root / "run"


def assert_trainer_state_holds_only_adapters(step_dir) -> None:
    """The DCP trainer state of a LoRA step has no base weight, not even a tied lm_head
    (which torch keeps under its second name)."""
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(step_dir / "trainer")).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys), model_keys


def assert_peft_adapter_matches_merged_export(step_dir, base_dir) -> None:
    """peft's base + adapter (from `step_dir`) and transformers' load of `step_dir/merged`
    give the same logits, which differ from the base's (the adapters learned something)."""
    import torch

    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(tokens).logits
        adapted = peft.PeftModel.from_pretrained(base, step_dir).eval()(tokens).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(step_dir / "merged", torch_dtype=torch.float32)
        merged_logits = merged.eval()(tokens).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    torch.testing.assert_close(adapted, merged_logits, rtol=1e-4, atol=1e-4)


def assert_merged_into_checkpoint_weights(step_dir, base_dir, *, also=None) -> None:
    """`step_dir/merged` holds W + (alpha / r) B A (alpha 8, rank 4, as `LORA`) on the base
    checkpoint's own weights for all 28 adapted projections of the tiny model, every other
    tensor unchanged; `also(key, base_weight, merged_weight, delta)` checks each adapted one more."""
    import torch
    from safetensors.torch import load_file

    base = load_file(base_dir / "model.safetensors")
    adapter = load_file(step_dir / "adapter_model.safetensors")
    merged = load_file(step_dir / "merged" / "model.safetensors")
    adapted = 0
    for key, weight in base.items():
        prefix = "base_model.model." + key.removesuffix(".weight")
        if prefix + ".lora_A.weight" not in adapter:
            torch.testing.assert_close(merged[key], weight.float(), rtol=0, atol=0, msg=key)
            continue
        delta = 2.0 * adapter[prefix + ".lora_B.weight"].float() @ adapter[prefix + ".lora_A.weight"].float()
        assert delta.abs().max() > 0, key
        torch.testing.assert_close(merged[key], weight.float() + delta, msg=key)
        if also is not None:
            also(key, weight, merged[key], delta)
        adapted += 1
    assert adapted == 4 * 7


def assert_stopped_run_resumes_exactly(full, resumed, settings, monkeypatch) -> dict:
    """`resumed`, stopped during step 3 (as on SIGTERM) and run again with `settings`, logs
    `full`'s losses and ends with its step-6 adapters bitwise; returns `full`'s adapters."""
    import torch
    from safetensors.torch import load_file

    with monkeypatch.context() as patch:
        stop_after(patch, 3)
        run_finetune(resumed, *settings)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_3"]
    assert run_finetune(resumed, *settings) == 0
    assert [m["loss"] for m in read_metrics(full)] == [m["loss"] for m in read_metrics(resumed)]
    a = load_file(full / "checkpoints" / "step_6" / "adapter_model.safetensors")
    b = load_file(resumed / "checkpoints" / "step_6" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return a
