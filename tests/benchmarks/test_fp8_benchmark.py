"""train_throughput's fp8 variants: skipped with the reason where float8 cannot run,
compared with ft's bf16 variant of the same settings when they ran."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import common  # noqa: E402
import train_throughput  # noqa: E402


def test_fp8_variants_are_skipped_on_a_cpu_with_the_reason():
    config = train_throughput.tiny_config("llama3_2_1b")
    for workload in ("a", "b"):
        fp8 = [v for v in train_throughput.WORKLOADS[workload]["variants"] if v.fp8 != "none"]
        assert {v.fp8 for v in fp8} == {"tensorwise", "rowwise"}
        for variant in fp8:
            reason = train_throughput.preflight(config, variant, torch.device("cpu"))
            assert reason is not None and "needs a CUDA GPU" in reason


def test_fp8_ratios_against_bf16_and_hf():
    ok = dict(status="ok", precision="bf16")
    results = [
        {"name": "ft_bf16_compile", "impl": "ft", "fp8": "none", "tokens_per_s": 100.0, **ok},
        {"name": "ft_fp8_tensorwise_compile", "impl": "ft", "fp8": "tensorwise", "tokens_per_s": 130.0, **ok},
        {"name": "hf_bf16_compile", "impl": "hf", "fp8": "none", "tokens_per_s": 80.0, **ok},
    ]
    writer = common.ResultWriter(None, {"benchmark": "test"})
    writer.doc["results"] = results
    train_throughput.add_ratios(writer, "a")
    ratios = writer.doc["ratios"]
    assert ratios["ft_fp8_tensorwise_compile / ft_bf16_compile"] == 1.3
    assert ratios["ft_fp8_tensorwise_compile / hf_bf16_compile"] == 130 / 80
