"""QLoRA (`lora.base_quantization=nf4`, torchao's NF4) through the recipe on CPU, on the
embedded default in float32: the loss falls, the frozen NF4 base stays out of the
trainer state, a stopped run resumes bitwise, PEFT loads the adapter on the original
base, and the merged export is merged into the base checkpoint's own weights."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ft.errors import ConfigError
from ft.lora import LoraConfig
from ft.lora.training import check_lora_run
from tests.lora.lora_runs import (
    LORA,
    assert_merged_into_checkpoint_weights,
    assert_peft_adapter_matches_merged_export,
    assert_stopped_run_resumes_exactly,
    assert_trainer_state_holds_only_adapters,
)
from tests.recipes.conftest import read_metrics, run_finetune, user_assets  # noqa: F401  (a fixture)

pytest.importorskip("torchao")

QLORA = [*LORA, "lora.base_quantization=nf4"]


def test_qlora_loss_falls_the_base_stays_out_of_the_trainer_state_and_a_run_resumes_exactly(
        tmp_path, user_assets, monkeypatch):
    settings = [*QLORA, "max_num_steps=6", "checkpoint_every_n_steps=100"]
    full = tmp_path / "full"
    assert run_finetune(full, *settings) == 0
    losses = [m["loss"] for m in read_metrics(full)]
    assert losses[-1] < losses[0]
    # The NF4 base computes other logits than the full-precision one.
    lora = tmp_path / "lora"
    assert run_finetune(lora, *LORA, "max_num_steps=1") == 0
    assert abs(read_metrics(lora)[0]["loss"] - losses[0]) > 1e-4

    assert_stopped_run_resumes_exactly(full, tmp_path / "resumed", settings, monkeypatch)

    assert_trainer_state_holds_only_adapters(full / "checkpoints" / "step_6")


def test_qlora_exports_use_the_original_base(tmp_path, user_assets):
    pytest.importorskip("peft")
    from ft.assets import load_card
    from ft.lora.quant import to_nf4

    out = tmp_path / "run"
    assert run_finetune(out, *QLORA, "max_num_steps=3", "lora.export_merged=true") == 0
    step_dir = out / "checkpoints" / "step_3"
    base_dir = load_card("ft_tiny").path("checkpoint")

    def not_merged_into_nf4(key, weight, merged, delta):
        # Merging into the dequantized NF4 weight instead would be far off.
        nf4_weight = to_nf4(weight, dtype=torch.float32, name=key).get_original_weight()
        assert (merged - (nf4_weight + delta)).abs().max() > 1e-3, key

    assert_merged_into_checkpoint_weights(step_dir, base_dir, also=not_merged_into_nf4)
    assert_peft_adapter_matches_merged_export(step_dir, base_dir)


SOURCE = SimpleNamespace(checkpoint=Path("base"), description="base")


@pytest.mark.parametrize("layout, message", [
    ({"dp_size": 2, "tp_size": 2}, "tensor parallelism or pipeline stages is not supported"),
    ({"dp_size": 1, "tp_size": 1, "pp_size": 2}, "tensor parallelism or pipeline stages is not supported"),
    ({"dp_size": 2, "tp_size": 1, "fsdp_replicas": 2}, "'fsdp_replicas' \\(2\\) leaves one process per FSDP shard"),
    ({"dp_size": 2, "tp_size": 1, "data_parallelism": "ddp"}, "'data_parallelism' \\(ddp\\) does not combine"),
])
def test_qlora_refuses_layouts_that_split_or_do_not_gather_nf4(layout, message):
    config = LoraConfig(enabled=True, base_quantization="nf4")
    with pytest.raises(ConfigError, match=message):
        check_lora_run(config, source=SOURCE, **layout)
    check_lora_run(LoraConfig(enabled=True), source=SOURCE, **layout)  # LoRA itself runs on these
    check_lora_run(config, source=SOURCE, dp_size=2, tp_size=1)  # FSDP2
    check_lora_run(config, source=SOURCE, dp_size=4, tp_size=1, fsdp_replicas=2)  # HSDP, 2 shards per replica


def test_qlora_without_torchao_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao.dtypes", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="needs torchao"):
        check_lora_run(LoraConfig(enabled=True, base_quantization="nf4"), source=SOURCE, dp_size=1, tp_size=1)
