"""benchmarks/memory_savers.py end to end on CPU with tiny dims, on a few variants:
each trains and reports the fields docs/benchmarks.md is filled from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_memory_savers_tiny(tmp_path):
    out = tmp_path / "memory_savers.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    variants = "bf16_adamw,cap_adafactor_inbwd_full_sr,mixed_adamw_cpuoffload_selective"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_savers.py"), "--device", "cpu", "--tiny",
                           "--archs", "llama3_2_1b", "--variants", variants, "--steps", "1", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    results = {r["name"]: r for r in doc["results"]}
    assert all(r["status"] == "ok" for r in results.values()), results
    assert all(r["predicted_peak_gib"] > 0 and "tokens_per_s" in r for r in results.values())
    summary = doc["summary_llama3_2_1b"]
    assert summary["best_unconstrained"] == "llama3_2_1b/bf16_adamw"
    assert "llama3_2_1b/cap_adafactor_inbwd_full_sr" in summary["capped"]
