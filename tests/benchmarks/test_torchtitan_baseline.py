"""benchmarks/torchtitan_baseline.py: its placeholder modules (for torchtitan's
imports that the step never reaches) import like the real ones and refuse use; with
torchtitan installed, the CPU smoke run writes the fields ft's rows have."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import torchtitan_baseline  # noqa: E402


def test_placeholder_imports_like_the_module_and_refuses_use(monkeypatch):
    module = torchtitan_baseline._placeholder("datasets", ["Dataset", "load_dataset"])
    monkeypatch.setitem(sys.modules, "datasets", module)
    from datasets import Dataset, load_dataset  # what torchtitan's text dataset imports

    class Sub(Dataset):  # usable as a base class and in isinstance
        pass

    assert not isinstance(object(), Dataset)
    with pytest.raises(RuntimeError, match="placeholder"):
        load_dataset("c4")
    with pytest.raises(RuntimeError, match="placeholder"):
        Sub()


def test_tyro_placeholder_gives_an_inert_registry():
    tyro = torchtitan_baseline._placeholder("tyro", ["cli", "constructors"])
    registry = tyro.constructors.ConstructorRegistry()  # torchtitan.config.manager does this at import

    @registry.primitive_rule
    def rule(type_info):
        return None

    assert rule(None) is None
    with pytest.raises(RuntimeError, match="placeholder"):
        tyro.cli(object)


def test_cpu_smoke_run(tmp_path):
    pytest.importorskip("torchtitan", reason="torchtitan is carried as a wheel for the GPU machine (.whl/)")
    out = tmp_path / "tt.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / "torchtitan_baseline.py"), "--device", "cpu", "--tiny",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    (result,) = doc["results"]
    assert result["status"] == "ok" and result["impl"] == "torchtitan"
    assert result["tokens_per_s"] > 0 and result["mfu_measured_peak"] > 0
    assert result["tokens_per_step"] == 2 * 64
    assert all(math.isfinite(x) and 0 < x < 10 for x in result["losses"])
    assert doc["settings"]["training.dtype"] == "bfloat16"
    assert doc["settings"]["activation_checkpoint"]["selective_ac_option"] == "op"
