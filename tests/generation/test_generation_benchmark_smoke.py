"""benchmarks/generate_throughput.py runs on CPU with a tiny model and reports every
configuration, with ft's and transformers' greedy tokens in agreement; with
`--train-steps` it trains on GSM8K-shaped rows first and measures that agreement."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tests.benchmarks.gsm8k_like import write_gsm8k_like

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "generate_throughput.py"


def _script():
    spec = importlib.util.spec_from_file_location("generate_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_smoke(tmp_path):
    module = _script()
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


def test_greedy_agreement_counts_the_common_prefix_up_to_k_and_the_stop():
    agreement = _script().greedy_agreement
    ft = [[5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [1, 2, 3], [4, 2, 9, 9], [3, 3, 3]]
    hf = [[5, 6, 7, 8, 0], [5, 0, 7, 8, 9], [1, 2, 3], [4, 2, 0, 0], [3, 3, 3]]
    result = agreement(ft, hf, k=4, stop_ids={2})
    # Cut at 4 tokens; rows 3 and 4 end at the stop id 2 (after it nothing counts).
    assert result["agreed_prefix"] == [4, 1, 2, 2, 3]
    assert result["compared"] == [4, 4, 2, 2, 3]
    assert result["prompts_fully_agreeing"] == 4 and result["num_prompts"] == 5
    assert result["fraction"] == 12 / 15
    assert agreement([[1, 2]], [[2, 1]], k=2)["fraction"] == 0.0
    with pytest.raises(ValueError, match="1 ft sequences against 2"):
        agreement([[1]], [[1], [1]], k=1)


def test_benchmark_trains_on_gsm8k_and_reports_agreement(tmp_path):
    pytest.importorskip("tokenizers")
    write_gsm8k_like(tmp_path / "train.jsonl", 40)
    write_gsm8k_like(tmp_path / "test.jsonl", 5)
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--tiny", "--batch-sizes", "2", "--prompt-len", "6", "--new-tokens", "4",
            "--repeats", "1", "--ft-modes", "eager", "--hf-caches", "dynamic", "--train-steps", "12",
            "--train-tokens", "512", "--gsm8k", str(tmp_path / "train.jsonl"), "--tokenizer-vocab", "300",
            "--agree-prompts", "3", "--agree-tokens", "6", "--out", str(out)]
    assert _script().main(args) == 0
    report = json.loads(out.read_text())
    assert report["errors"] == {} and report["weights"] == "trained on GSM8K"
    training = report["training"]
    assert training["steps"] == 12 and len(training["loss_curve"]) == 12
    assert training["loss_curve"][-1] < training["loss_curve"][0]  # it learned something
    assert abs(training["final_loss"] - sum(training["loss_curve"][-10:]) / 10) < 1e-9
    agreement = report["greedy_agreement"]["per_mode"]["ft/eager"]
    assert agreement["num_prompts"] == 3 and len(agreement["agreed_prefix"]) == 3
    assert agreement["fraction"] == 1.0  # float32 on CPU: the same greedy tokens
