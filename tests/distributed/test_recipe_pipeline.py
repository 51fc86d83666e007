"""`ft lm instruction_finetune` with pipeline stages, on 2 and 4 gloo processes via torchrun.

pp=2 (1f1b, gradient_accumulation=2), and pp=2 x tp=2, train like one process with
gradient_accumulation=2: loss curve, grad norms, validation, and the HF model each
checkpoint exports (gathered from both stages). A checkpoint saved on pp=2 resumes
on dp=2 and one saved on dp=2 resumes on pp=2 (DCP reshards: the stages keep the
full model's names), both continuing the uninterrupted curve. Impossible pipeline
layouts fail before any work.
"""

from __future__ import annotations

import shutil

import pytest

from test_recipe_parallel import WEIGHT_ATOL, Runs, assert_ok, assert_same_curve, assert_same_weights, launch

PP2 = ("pipeline_parallel_size=2", "gradient_accumulation=2")


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


@pytest.mark.parametrize("source, overrides", [("pp2", ()), ("fsdp_dp2", PP2)], ids=["pp2_as_dp2", "dp2_as_pp2"])
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


# The other impossible layouts are checked without launching (tests/distributed/test_pipeline.py).
@pytest.mark.parametrize("overrides, message", [
    (["pipeline_parallel_size=3"], "pipeline_parallel_size=3 does not divide the 2 processes"),
])
def test_impossible_pipeline_layouts_fail_first(runs, overrides, message):
    result = launch(runs.root / f"bad_{overrides[0]}", 2, *overrides, asset_dir=runs.asset_dir)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "step 1 loss" not in result.stdout
