"""The training-speed benchmarks run end to end on CPU with tiny dims (`--device cpu
--tiny`), each in its own process as on the GPU machine, and write the JSON fields
that docs/benchmarks.md is filled from; fsdp_throughput.py runs under torchrun with 2
gloo processes and trains (its loss falls on the memorised random tokens)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.gsm8k_like import write_gsm8k_like

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
TIMED = ["tokens_per_s", "target_tokens_per_s", "computed_tokens_per_s", "step_time_ms_median", "mfu_measured_peak",
         "window_s", "achieved_tflops", "setup_s"]


def _run(args: list[str], tmp_path: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _check_timed(result: dict) -> None:
    assert result["status"] == "ok", result
    for key in TIMED:
        assert isinstance(result[key], float) and result[key] > 0, (result["name"], key, result[key])
    assert result["timed_steps"] == 2 and len(result["losses"]) == 2
    assert all(math.isfinite(x) and 0 < x < 10 for x in result["losses"]), result["losses"]
    assert result["target_tokens_per_s"] <= result["tokens_per_s"] <= result["computed_tokens_per_s"] * (1 + 1e-9)


def _check_header(doc: dict) -> None:
    assert doc["tiny"] is True
    assert doc["matmul_peak"]["tflops"] > 0
    assert doc["environment"]["torch"] and doc["environment"]["date"]
    assert doc["flops_per_token"] > 0


@pytest.mark.parametrize("workload", ["a", "b", "qwen3_8b"])
def test_train_throughput_full_rows(tmp_path, workload):
    out = tmp_path / f"{workload}.json"
    proc = _run([sys.executable, str(BENCH / "train_throughput.py"), "--workload", workload, "--device", "cpu",
                 "--tiny", "--out", str(out)], tmp_path)
    doc = json.loads(out.read_text())
    _check_header(doc)
    sys.path.insert(0, str(BENCH))
    try:
        import train_throughput
    finally:
        sys.path.remove(str(BENCH))
    assert [r["name"] for r in doc["results"]] == train_throughput.WORKLOADS[workload]["default"]
    impls = set()
    for r in doc["results"]:
        _check_timed(r)
        impls.add(r["impl"])
        assert r["padding_fraction"] == 0.0 and r["batch_size"] == 2 and r["seq_len"] == 64
        assert r["compile"] is False  # CPU smoke: eager
    assert impls == {"ft", "hf"}
    # ft and HF see the same random rows with the same random init scale: similar starting losses.
    ft_loss = [r["losses"][0] for r in doc["results"] if r["impl"] == "ft"]
    hf_loss = [r["losses"][0] for r in doc["results"] if r["impl"] == "hf"]
    assert abs(ft_loss[0] - hf_loss[0]) < 0.2, (ft_loss, hf_loss)
    assert doc["ratios"] and all(v > 0 for v in doc["ratios"].values())
    if workload == "b":
        assert any("torchtitan" in k for k in doc["ratios"])
    assert "ft_" in proc.stdout and "tok/s" in proc.stdout


def test_train_throughput_partial_checkpointing_variant(tmp_path):
    """A variant that checkpoints only some blocks: on the 2-block tiny model, 28 of 32 becomes 1 of 2."""
    out = tmp_path / "b.json"
    _run([sys.executable, str(BENCH / "train_throughput.py"), "--workload", "b", "--device", "cpu", "--tiny",
          "--variants", "ft_bf16_compile_ac-selective-blocks28", "--out", str(out)], tmp_path)
    (result,) = json.loads(out.read_text())["results"]
    _check_timed(result)
    assert result["activation_checkpointing"] == "selective" and result["activation_checkpointing_blocks"] == 1


def test_train_throughput_gsm8k_packing_vs_padding(tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    write_gsm8k_like(data, 120)
    out = tmp_path / "c.json"
    _run([sys.executable, str(BENCH / "train_throughput.py"), "--workload", "c", "--device", "cpu", "--tiny",
          "--gsm8k", str(data), "--out", str(out)], tmp_path)
    doc = json.loads(out.read_text())
    _check_header(doc)
    stats = doc["data"]
    assert stats["num_examples"] == 120 and 0 < stats["target_fraction"] < 1
    assert stats["median_tokens"] <= stats["p95_tokens"] <= stats["max_tokens"]
    by_name = {r["name"]: r for r in doc["results"]}
    assert set(by_name) == {"ft_bf16_compile_packed", "hf_bf16_eager_pad32", "hf_bf16_eager_pad16"}
    for r in by_name.values():
        _check_timed(r)
    packed = by_name["ft_bf16_compile_packed"]
    padded = by_name["hf_bf16_eager_pad32"]
    assert packed["rows"] == "packed" and padded["batch_examples"] == 4  # tiny caps HF batches at 4
    assert 0 < padded["padding_fraction"] < 1
    # Target tokens are a fixed share of each example on both sides.
    assert abs(packed["target_tokens_per_s"] / packed["tokens_per_s"] - stats["target_fraction"]) < 0.15
    assert doc["ratio_key"] == "target_tokens_per_s"
    assert "ft_bf16_compile_packed / hf_bf16_eager_pad32" in doc["ratios"]


def test_fsdp_throughput_two_gloo_processes(tmp_path):
    out = tmp_path / "d.json"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          str(BENCH / "fsdp_throughput.py"), "--device", "cpu", "--tiny", "--ac", "full", "--warmup", "2",
          "--out", str(out)], tmp_path, timeout=180)
    doc = json.loads(out.read_text())
    _check_header(doc)
    assert doc["world_size"] == 2 and doc["dp_size"] == 2 and doc["tp_size"] == 1
    assert len(doc["matmul_peak"]["tflops_per_rank"]) == 2
    (r,) = doc["results"]
    _check_timed(r)
    assert r["name"] == "ft_fsdp2_mixed_eager_ac-full_2x64"
    assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / 2)
    assert len(r["step_time_ms_median_per_rank"]) == 2
    # Fixed random tokens, lr 3e-4: the global loss falls from warm-up to the last timed step.
    curve = r["losses_warmup"] + r["losses"]
    assert len(curve) == 4 and curve[-1] < curve[0] - 0.05, curve


def test_run_all_gpu_script_parses():
    proc = subprocess.run(["bash", "-n", str(BENCH / "run_all_gpu.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_profile_decode_reports_the_step_on_cpu(tmp_path):
    out = tmp_path / "prof.txt"
    _run([sys.executable, str(BENCH / "profile_decode.py"), "--device", "cpu", "--arch", "llama_debug",
          "--batch-size", "2", "--prompt-len", "8", "--new-tokens", "4", "--attention", "math",
          "--inductor-option", "coordinate_descent_tuning=True", "--out", str(out)], tmp_path, timeout=300)
    text = out.read_text()
    assert "attention='math'" in text and "('coordinate_descent_tuning', True)" in text
    assert "cuda_graphs=True:" in text and "cuda_graphs=False:" in text
    assert "no graph was captured" in text and "kernels per step" in text
