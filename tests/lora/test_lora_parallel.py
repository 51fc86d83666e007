"""LoRA under FSDP2, HSDP, DDP and tensor parallelism, and QLoRA under FSDP2, on
2 gloo processes (torchrun), float32: dp=2 trains like one process with
gradient_accumulation=2, tp=2 like one process, compared by loss curve and the saved
adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.recipes.conftest import FAST, user_assets  # noqa: F401  (a fixture)

SETTINGS = [*FAST, "dtype=float32", "save_model_dtype=float32", "max_num_steps=3", "lora.enabled=true",
            "lora.rank=4", "lora.alpha=8", "learning_rate=1e-2"]
NF4 = "lora.base_quantization=nf4"
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK")


def launch(out: Path, nproc: int, *overrides: str, asset_dir: Path) -> None:
    command = ["-m", "ft.cli", "lm", "instruction_finetune", str(out), "--no-sweep-dir", "--config", *SETTINGS,
               *overrides]
    if nproc > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *command]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(FT_USER_ASSET_DIR=str(asset_dir), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics" / "train.jsonl").read_text().splitlines()]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / "step_3" / "adapter_model.safetensors")


@pytest.mark.parametrize("layout, reference, atol", [
    (["data_parallelism=fsdp"], ["gradient_accumulation=2"], 1e-5),
    (["data_parallelism=ddp"], ["gradient_accumulation=2"], 1e-5),
    # HSDP with 2 replicas of 1 shard: the replicate dim alone carries the gradient reduction.
    (["fsdp_replicas=2"], ["gradient_accumulation=2"], 1e-5),
    (["tensor_parallel_size=2"], [], 1e-4),
    # QLoRA: every layout quantizes each weight whole, so both hold the same NF4 base.
    (["data_parallelism=fsdp", NF4], ["gradient_accumulation=2", NF4], 1e-5),
])
def test_lora_on_two_processes_trains_like_one(tmp_path, user_assets, layout, reference, atol):
    launch(tmp_path / "one", 1, *reference, asset_dir=user_assets)
    launch(tmp_path / "two", 2, *layout, asset_dir=user_assets)
    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-6, atol=0)
    ours, theirs = adapter(tmp_path / "two"), adapter(tmp_path / "one")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=atol, msg=key)
