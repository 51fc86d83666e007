"""A tiny LoRA run through the recipe, shared by the tests that read its adapter."""

from __future__ import annotations

import pytest

from tests.recipes.conftest import run_finetune

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
