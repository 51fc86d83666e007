"""benchmarks/precision_curves.py on CPU with the tiny arch and generated GSM8K-style
rows: the three precisions run through the recipe's CLI, and at a tolerance fitted to
16 tiny steps bf16 with stochastic rounding stays on the fp32-master curve while plain
bf16 (its updates rounded away) falls behind."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.gsm8k_like import write_gsm8k_like

pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "precision_curves.py"


def _run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    data = tmp_path / "gsm8k.jsonl"
    if not data.exists():
        write_gsm8k_like(data, 200)
    out = tmp_path / "curves.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--gsm8k", str(data),
                           "--out", str(out), *extra], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_precision_curves_tiny(tmp_path):
    # 16 tiny steps move the loss by a few hundredths, so a 1% relative tolerance (0.07 at
    # a loss of 7) cannot tell the curves apart; 0.01 absolute can.
    _, doc = _run(tmp_path, "--rel-tol", "0", "--abs-tol", "0.01")
    results = {r["name"]: r for r in doc["results"]}
    assert list(results) == ["fp32_master", "bf16_sr", "bf16_plain"]
    for name, r in results.items():
        assert r["status"] == "ok", r
        assert r["steps"] == 16 and len(r["losses"]) == 16
        assert all(math.isfinite(x) for x in r["losses"]) and r["tokens_per_s"] > 0
    # The variant's keys reached the recipe.
    assert "mixed_precision: true" in results["fp32_master"]["effective_config"]
    assert "mixed_precision: false" in results["bf16_plain"]["effective_config"]
    assert "bf16_stochastic_rounding: false" in results["bf16_plain"]["effective_config"]
    assert "bf16_stochastic_rounding: true" in results["bf16_sr"]["effective_config"]
    # Same seed: the same initial weights (up to bf16 rounding) and the same first batch.
    first = [r["losses"][0] for r in results.values()]
    assert max(first) - min(first) < 0.01, first

    sr, plain = doc["comparisons"]["bf16_sr"], doc["comparisons"]["bf16_plain"]
    assert sr["steps_compared"] == "9..16" and sr["tolerance_final"] == 0.01
    assert sr["within_tolerance"] and not sr["behind"], sr
    assert plain["behind"] and not plain["within_tolerance"], plain
    assert plain["mean_signed_diff"] > 10 * sr["mean_abs_diff"], (plain, sr)
    assert doc["verdict"] == {"bf16_sr_follows_fp32_master": True, "bf16_plain_falls_behind": True}


def test_precision_curves_budget_spent(tmp_path):
    _, doc = _run(tmp_path, "--budget-s", "0", "--variants", "fp32_master,bf16_sr")
    assert [(r["name"], r["status"]) for r in doc["results"]] == [("fp32_master", "skipped"), ("bf16_sr", "skipped")]
    assert doc["comparisons"] == {} and doc["verdict"]["bf16_sr_follows_fp32_master"] is None


def test_compare_smoothed_second_half():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import precision_curves
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert precision_curves.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    ref = [5.0 - 0.01 * i for i in range(40)]
    same = precision_curves.compare(ref, ref, window=10, abs_tol=0.02, rel_tol=0.01)
    assert same["max_abs_diff"] == 0 and same["within_tolerance"] and not same["behind"]
    # A gap opening only in the second half, larger than 1% of a loss near 4.7.
    lagging = ref[:20] + [x + 0.2 for x in ref[20:]]
    gap = precision_curves.compare(ref, lagging, window=10, abs_tol=0.02, rel_tol=0.01)
    assert gap["steps_compared"] == "21..40"
    assert gap["max_abs_diff"] == pytest.approx(0.2) and gap["final_diff"] == pytest.approx(0.2)
    # The 10-step average of the jump climbs 0.02, 0.04, ..., 0.2 over steps 21..30, then stays.
    assert gap["mean_signed_diff"] == pytest.approx((0.02 * sum(range(1, 11)) + 0.2 * 10) / 20)
    assert gap["behind"] and not gap["within_tolerance"]


def test_lora_variants_train_on_a_made_base(tmp_path):
    """LoRA needs weights: a short full fine-tuning run makes the base, and every LoRA variant
    (here the float8 frozen base against bf16) starts from it and is compared with `--reference`."""
    _, doc = _run(tmp_path, "--variants", "lora_bf16,lora_fp8_tensorwise", "--reference", "lora_bf16",
                  "--steps", "8", "--lora-base-steps", "8", "--learning-rate", "1e-3")
    base = doc["lora_base"]
    assert base["status"] == "ok" and base["steps"] == 8
    results = {r["name"]: r for r in doc["results"]}
    for r in results.values():
        assert r["status"] == "ok" and r["steps"] == 8, r
        assert "enabled: true" in r["effective_config"] and "/lora_base/checkpoints/step_8" in r["effective_config"]
        # The adapters start at B = 0: the first loss is the trained base's, below its own first loss.
        assert r["losses"][0] < base["losses"][0] - 0.1, (r["losses"][0], base["losses"])
    assert "fp8: tensorwise" in results["lora_fp8_tensorwise"]["effective_config"]
    assert doc["reference"] == "lora_bf16" and list(doc["comparisons"]) == ["lora_fp8_tensorwise"]
    assert doc["verdict"]["lora_fp8_tensorwise_follows_lora_bf16"] is True


def test_reference_must_be_a_variant(tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    write_gsm8k_like(data, 20)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--gsm8k", str(data), "--variants", "lora_fp8_rowwise",
                           "--reference", "lora_bf16"], env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--reference lora_bf16 is not among --variants" in proc.stderr
