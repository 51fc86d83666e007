"""benchmarks/lora_train.py end to end on CPU with tiny dims: ft's LoRA step and the
transformers + PEFT baseline both train and report the JSON fields
docs/benchmarks.md is filled from; QLoRA variants are recorded as skipped on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[2]


def test_lora_memory_workload_tiny(tmp_path):
    out = tmp_path / "memory.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora_train.py"), "--workload", "memory",
                           "--device", "cpu", "--tiny", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    by_name = {r["name"]: r for r in doc["results"]}
    assert by_name["hf_peft_qlora_ac"]["status"] == "skipped"  # bitsandbytes is not installed
    offloaded = ("ft_lora_ac_offload", "ft_qlora_ac_offload", "ft_lora_bf16_ac_offload", "ft_qlora_bf16_ac_offload",
                 "ft_lora_bf16_ac_offload_hostemb", "ft_qlora_bf16_ac_offload_hostemb")
    for name in ("ft_lora_ac", "ft_qlora_ac", "hf_peft_lora_ac", *offloaded):
        result = by_name[name]
        assert result["status"] == "ok", result
        assert result["tokens_per_s"] > 0 and 0 < result["mfu_lora_count_measured_peak"] < result["mfu_measured_peak"]
        assert result["trainable_params"] == by_name["ft_lora_ac"]["trainable_params"]  # the same adapters
    assert all(by_name[name]["offload"] and by_name[name]["ac"] == "full" for name in offloaded)
    assert [by_name[name]["precision"] for name in offloaded] == ["mixed", "mixed", "bf16", "bf16", "bf16", "bf16"]
    assert [by_name[name]["host_embeddings"] for name in offloaded] == [False] * 4 + [True] * 2
    assert doc["tiny"] is True and doc["published"]["nemo_automodel_tokens_per_s"] == 12_473
