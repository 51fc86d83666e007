"""benchmarks/generate_throughput.py runs on CPU with a tiny model and reports every
configuration, with ft's and transformers' greedy tokens in agreement."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "generate_throughput.py"


def test_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("generate_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--tiny", "--batch-sizes", "1", "3", "--prompt-len", "6", "--new-tokens", "5",
            "--repeats", "1", "--ft-modes", "eager", "cuda_graph", "--out", str(out)]
    assert module.main(args) == 0
    report = json.loads(out.read_text())
    assert report["arch"] == "llama_debug" and report["errors"] == {}
    assert {(r["impl"], r["mode"], r["batch_size"]) for r in report["results"]} == {
        (impl, mode, b) for b in (1, 3) for impl, mode in
        [("ft", "eager"), ("ft", "cuda_graph"), ("transformers", "dynamic_cache"), ("transformers", "static_cache")]
    }
    for r in report["results"]:
        assert r["tokens_per_s"] > 0
        if r["impl"] == "ft":
            assert r["decode_path"] == "eager"  # no CUDA here: the graph mode says it fell back
    for row in report["summary_tokens_per_s"].values():
        assert all(row["first_tokens_agree"].values())
