"""`ft lm instruction_finetune` with pipeline stages, on 2 and 4 gloo processes via torchrun.

pp=2 (1f1b, gradient_accumulation=2), and pp=2 x tp=2, train like one process with
gradient_accumulation=2: loss curve, grad norms, validation, and the HF model each
checkpoint exports (gathered from both stages). A checkpoint saved on pp=2 resumes
on dp=2 and on pp=2, and one saved on dp=2 resumes on pp=2 (DCP reshards: the stages
keep the full model's names), all continuing the uninterrupted curve. LoRA on pp=2
trains like one process too, exports the PEFT adapter of every stage, keeps only the
adapters in each stage's trainer state, and resumes bitwise on pp=2 (on one process
within the tolerances above).
Impossible pipeline layouts fail before any work.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from test_recipe_parallel import (
    WEIGHT_ATOL, Runs, assert_ok, assert_same_curve, assert_same_weights, launch, metrics,
)

PP2 = ("pipeline_parallel_size=2", "gradient_accumulation=2")
LORA = ("lora.enabled=true", "lora.rank=4", "lora.alpha=8", "learning_rate=1e-2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("recipe_pipeline"))


def test_pp2_matches_one_process_with_accumulation(runs):
    out = runs.get("pp2", 2, *PP2)
    reference = runs.one_process_accumulating_2()
    assert_same_curve(out, reference)
    assert_same_weights(out, reference, atol=WEIGHT_ATOL["dp"])


def test_pp2_x_tp2_matches_one_process_with_accumulation(runs):
    out = runs.get("pp2_tp2", 4, *PP2, "tensor_parallel_size=2")
    reference = runs.one_process_accumulating_2()
    assert_same_curve(out, reference)
    assert_same_weights(out, reference, atol=WEIGHT_ATOL["tp"])


@pytest.mark.parametrize("source, overrides", [("pp2", ()), ("pp2", PP2), ("fsdp_dp2", PP2)],
                         ids=["pp2_as_dp2", "pp2_as_pp2", "dp2_as_pp2"])
def test_resume_across_pipeline_layouts(runs, source, overrides):
    saved = runs.get("pp2", 2, *PP2) if source == "pp2" else runs.fsdp()
    reference = runs.one_process_accumulating_2()
    out = runs.root / f"resume_{source}_{len(overrides)}"
    shutil.copytree(saved, out)
    shutil.rmtree(out / "checkpoints" / "step_4")  # as if stopped right after step 2's checkpoint
    # The config of OUT says how it was started; the resumed layout comes from the command line.
    assert_ok(launch(out, 2, *(overrides or ("pipeline_parallel_size=1", "gradient_accumulation=1")),
                     asset_dir=runs.asset_dir))
    assert "resuming from" in (out / "logs" / "rank_0.log").read_text()
    assert_same_curve(out, reference)
    assert_same_weights(out, reference, atol=WEIGHT_ATOL["dp"], steps=(4,))


def adapter(run, step: int = 4) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step}" / "adapter_model.safetensors")


def trainer_keys(run, step: int = 4) -> set[str]:
    """The model tensors a step's DCP trainer state holds."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(run / "checkpoints" / f"step_{step}" / "trainer")).read_metadata()
    return {k for k in metadata.state_dict_metadata if k.startswith("model.")}


def test_lora_pp2_matches_one_process_with_accumulation(runs):
    out = runs.get("lora_pp2", 2, *PP2, *LORA)
    reference = runs.get("lora_one_ga2", 1, "gradient_accumulation=2", *LORA)
    assert_same_curve(out, reference)
    # The step dirs hold only the adapter: gathered from both stages, under the full model's
    # PEFT names (layers 0-3), equal to the one-process adapter.
    assert_same_weights(out, reference, atol=WEIGHT_ATOL["dp"])
    keys = adapter(out).keys()
    assert keys == adapter(reference).keys()
    assert {k.split(".")[4] for k in keys} == {"0", "1", "2", "3"}
    assert all(k.startswith("base_model.model.model.layers.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    # Each stage saved its share of the trainer state; together what one process saves.
    assert len(list((out / "checkpoints" / "step_4" / "trainer").glob("*.distcp"))) == 2
    assert trainer_keys(out) == trainer_keys(reference)
    assert {k.split(".")[3] for k in trainer_keys(out) if ".lora_A." in k} == {"0", "1", "2", "3"}


@pytest.mark.parametrize("nproc, overrides", [(2, PP2), (1, ("pipeline_parallel_size=1", "gradient_accumulation=2"))],
                         ids=["pp2", "one_process"])
def test_lora_pp2_resumes(runs, nproc, overrides):
    saved = runs.get("lora_pp2", 2, *PP2, *LORA)
    out = runs.root / f"resume_lora_pp2_{nproc}"
    shutil.copytree(saved, out)
    shutil.rmtree(out / "checkpoints" / "step_4")  # as if stopped right after step 2's checkpoint
    assert_ok(launch(out, nproc, *overrides, *LORA, asset_dir=runs.asset_dir))
    assert "resuming from" in (out / "logs" / "rank_0.log").read_text()
    if nproc == 2:  # the same layout: bitwise the uninterrupted run
        curve = [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(out)]
        assert curve == [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(saved)]
        want, got = adapter(saved), adapter(out)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    else:
        assert_same_curve(out, saved)
        assert_same_weights(out, saved, atol=WEIGHT_ATOL["dp"], steps=(4,))


# The other impossible layouts are checked without launching (tests/distributed/test_pipeline.py).
@pytest.mark.parametrize("overrides, message", [
    (["pipeline_parallel_size=3"], "pipeline_parallel_size=3 does not divide the 2 processes"),
])
def test_impossible_pipeline_layouts_fail_first(runs, overrides, message):
    result = launch(runs.root / f"bad_{overrides[0]}", 2, *overrides, asset_dir=runs.asset_dir)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "step 1 loss" not in result.stdout
