"""`ft lm preference_finetune` on 2 gloo processes (FSDP, dp=2) trains like one process
with gradient_accumulation=2: same reference table, loss curve, metrics and weights."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.test_recipe_parallel import clean_env
from tests.preference.conftest import write_copy_pairs

SETTINGS = ["max_seq_len=16", "max_num_tokens=64", "publish_metrics_every_n_steps=1", "warmup_steps=1",
            "dtype=float32", "save_model_dtype=float32", "max_num_steps=3", "learning_rate=3e-3",
            "reference_save_every_n_rounds=2"]


def launch(out: Path, nproc: int, dataset: Path, *overrides: str, asset_dir: Path) -> None:
    command = ["-m", "ft.cli", "lm", "preference_finetune", str(out), "--no-sweep-dir", "--config",
               f"dataset={dataset}", *SETTINGS, *overrides]
    if nproc > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *command]
    result = subprocess.run([sys.executable, *command], env=clean_env(asset_dir), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def test_fsdp_dp2_matches_one_process_with_accumulation_2(tmp_path):
    assets = tmp_path / "assets"
    assets.mkdir()
    data = write_copy_pairs(tmp_path / "train.jsonl", 24)
    one, two = tmp_path / "ga2", tmp_path / "dp2"
    launch(one, 1, data, "gradient_accumulation=2", asset_dir=assets)
    launch(two, 2, data, asset_dir=assets)
    table = "reference/logprobs.safetensors"
    torch.testing.assert_close(load_file(two / table)["logprobs"], load_file(one / table)["logprobs"],
                               rtol=1e-6, atol=1e-5)
    got, want = ([json.loads(x) for x in (out / "metrics" / "train.jsonl").read_text().splitlines()]
                 for out in (two, one))
    assert [m["step"] for m in got] == [1, 2, 3]
    for g, w in zip(got, want):
        assert g["pairs"] == w["pairs"]
        for key in ("loss", "grad_norm", "reward_accuracy", "chosen_reward", "rejected_logp"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (g["step"], key)
    wa, wb = (load_file(out / "checkpoints" / "step_3" / "model.safetensors") for out in (one, two))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5
