"""Loss curves of the recipe in three precisions: pure bf16 with stochastic rounding
follows fp32 master weights; pure bf16 without it falls behind.

    python3 benchmarks/precision_curves.py --out curves.json                  # one H200, ~6-7 min (estimate)
    python3 benchmarks/precision_curves.py --tiny --device cpu --out t.json   # smoke test

Each variant is one run of `ft lm instruction_finetune` through its CLI, as in
recipe_throughput.py: the preset `llama3_2_1b` (learning rate 2e-5, cosine, here
`warmup_steps=10`) on the 1B shape with random weights (a card with the arch and no
checkpoint), the GSM8K byte-level BPE of train_throughput.py, rows of 2048 and
16384 tokens per step, `--steps` (150) steps, the loss of every step
(`publish_metrics_every_n_steps=1`), one small save at the end (`save_model_only`; each
run's directory is deleted once read), `torch_compile` at its default:

  fp32_master  mixed_precision=true: float32 master weights and AdamW states, bf16 compute (ft's default)
  bf16_sr      mixed_precision=false bf16_stochastic_rounding=true: bf16 parameters, each update
               computed in float32 (float32 states) and rounded back stochastically
  bf16_plain   mixed_precision=false: bf16 parameters and states, updates rounded to nearest
  fp8_tensorwise  (optional, `--variants`; CUDA with torchao) fp32_master with float8 linears (tensorwise
               scaling): its loss curve against fp32_master's, e.g. `--variants fp32_master,fp8_tensorwise --steps 300`
  fp32_master_repeat  (optional, `--variants`) fp32_master again: on a GPU the kernels are not
               bitwise deterministic, so its distance from fp32_master is a floor for the noise
  lora_bf16, lora_bf16_repeat, lora_fp8_tensorwise, lora_fp8_rowwise  (optional; `--reference lora_bf16`)
               LoRA rank 16 (alpha 32) on every projection of the frozen base, adapters in float32; the
               fp8 ones keep the frozen base in float8 (ft.lora.float8_base, CUDA with float8 matmuls):
               their curves against bf16 LoRA's, e.g. `--variants lora_bf16,lora_fp8_tensorwise,
               lora_fp8_rowwise --reference lora_bf16 --learning-rate 1e-3 --steps 300`

All use the same seed, so the same initial weights (drawn in each variant's parameter
dtype) and the same batches in the same order. `--optimizer adamw|adafactor` goes to
every variant (the combinations need nothing else: stochastic rounding wraps either
optimizer; it only requires `mixed_precision=false` and `dtype=bfloat16`).

Why bf16_plain should fall behind: at lr 2e-5 an AdamW update is at most about 2e-5
per weight, while half a bf16 ulp of a weight w is |w|/512 to |w|/256: every update to
a weight above 1e-2 in magnitude (60% of a 0.02-std initialisation, all norm weights)
rounds back to the old value. With adafactor `learning_rate` is a relative step size
(the update is about lr x RMS(w), torch's semantics): the preset's 2e-5 barely moves any
variant and a step of 1e-2 survives rounding anyway; `--learning-rate 1e-3` shows the effect.

Comparison against fp32_master, per variant: a trailing moving average of the loss
over `--smooth` (10) steps, over the second half of the run (steps n/2+1..n): max and
mean |difference|, the mean signed difference (positive: behind), the final smoothed
losses. Pass (`within_tolerance`) when at every step of the second half
|smoothed difference| <= max(0.02, 1% of fp32_master's smoothed loss). Why this
tolerance: the variants see identical batches, so the batch-to-batch swings of the
per-step loss (tenths of a nat on GSM8K) are common to all and cancel in the
difference; the 10-step average removes the zero-mean jitter of stochastic rounding;
what is left is a systematic drift, and 1% of the loss (0.02 absolute where the loss is
small) is well below the gap of lost updates (bf16_plain) yet above the differences bf16
compute alone makes (both variants compute in bf16). `behind` is true when the mean signed
difference exceeds the mean tolerance. The tolerance is not yet calibrated on the GPU:
`fp32_master_repeat` measures the floor, and the JSON keeps every step's loss.

`--budget-s`: a variant is skipped (and recorded) when the longest finished one would
not fit in the time left, and a running one is stopped at the budget (recorded as
`timeout` with the steps it logged); the JSON is rewritten after every variant.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

_LORA = ["lora.enabled=true", "lora.rank=16", "lora.alpha=32"]
VARIANTS = {
    "fp32_master": ["mixed_precision=true"],
    "bf16_sr": ["mixed_precision=false", "bf16_stochastic_rounding=true"],
    "bf16_plain": ["mixed_precision=false"],
    "fp32_master_repeat": ["mixed_precision=true"],
    "fp8_tensorwise": ["mixed_precision=true", "fp8=tensorwise"],
    # LoRA rank 16 on every projection of the frozen bf16 base, adapters in float32 (mixed precision).
    "lora_bf16": ["mixed_precision=true", *_LORA],
    "lora_bf16_repeat": ["mixed_precision=true", *_LORA],
    "lora_fp8_tensorwise": ["mixed_precision=true", *_LORA, "fp8=tensorwise"],
    "lora_fp8_rowwise": ["mixed_precision=true", *_LORA, "fp8=rowwise"],
}
DEFAULT_VARIANTS = "fp32_master,bf16_sr,bf16_plain"
DEFAULT_REFERENCE = "fp32_master"


def smooth(losses: list[float], window: int) -> list[float]:
    """Trailing moving average (the first window-1 steps average what there is)."""
    out, total = [], 0.0
    for i, loss in enumerate(losses):
        total += loss - (losses[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def compare(reference: list[float], other: list[float], *, window: int, abs_tol: float,
            rel_tol: float) -> dict[str, Any]:
    """`other` against `reference` over the second half of the steps both ran."""
    n = min(len(reference), len(other))
    ref_s, other_s = smooth(reference[:n], window), smooth(other[:n], window)
    half = range(n // 2, n)
    diff = [other_s[i] - ref_s[i] for i in half]
    tol = [max(abs_tol, rel_tol * ref_s[i]) for i in half]
    mean_signed = statistics.fmean(diff)
    return {
        "steps_compared": f"{n // 2 + 1}..{n}",
        "max_abs_diff": max(abs(d) for d in diff),
        "mean_abs_diff": statistics.fmean(abs(d) for d in diff),
        "mean_signed_diff": mean_signed,
        "max_rel_diff": max(abs(d) / r for d, r in zip(diff, (ref_s[i] for i in half))),
        "final_smoothed_loss_reference": ref_s[-1],
        "final_smoothed_loss": other_s[-1],
        "final_diff": other_s[-1] - ref_s[-1],
        # how far the reference came: the gap in proportion to the learning in the run
        "reference_progress": ref_s[min(window, n) - 1] - ref_s[-1],
        "tolerance_final": tol[-1],
        "within_tolerance": all(abs(d) <= t for d, t in zip(diff, tol)),
        "behind": mean_signed > statistics.fmean(tol),
    }


def run_variant(name: str, keys: list[str], base_command: list[str], env: dict[str, str], out_dir: Path,
                timeout_s: float | None, keep: bool = False) -> dict[str, Any]:
    command = [*base_command[:5], str(out_dir), *base_command[5:], *keys]
    started = time.perf_counter()
    # Its own session, so a timeout ends the compile workers too.
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
        status = "ok" if proc.returncode == 0 else "error"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        status = "timeout"
    wall = time.perf_counter() - started
    metrics = out_dir / "metrics" / "train.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    config = (out_dir / "config.yaml").read_text() if (out_dir / "config.yaml").is_file() else None
    if not keep:
        shutil.rmtree(out_dir, ignore_errors=True)  # a 1B model's save is 2.5 GB
    result: dict[str, Any] = {"name": name, "status": status, "command": " ".join(command), "wall_s": wall}
    if status == "error":
        result["error"] = f"exit code {proc.returncode}"
        result["stderr_tail"] = stderr[-4000:]
    losses = [r["loss"] for r in rows]
    if [r["step"] for r in rows] != list(range(1, len(rows) + 1)):
        result.update(status="error", error="train.jsonl does not hold one line per step")
    timed = [r for r in rows if "tokens_per_s" in r]
    steady = timed[3:] or timed  # the first timed steps still compile and grow the allocator
    result.update({
        "steps": len(losses),
        "losses": losses,
        "initial_loss": losses[0] if losses else None,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady) if steady else None,
        "target_tokens_per_s": statistics.median(r["target_tokens_per_s"] for r in steady) if steady else None,
        "warmup_s": next((r["warmup_s"] for r in rows if "warmup_s" in r), None),
        "peak_memory_gib": max((r["peak_memory_gib"] for r in rows if "peak_memory_gib" in r), default=None),
        "effective_config": config,
    })
    return result


def comparisons(results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    by_name = {r["name"]: r for r in results if r["status"] == "ok"}
    if args.reference not in by_name:
        return {}
    return {name: compare(by_name[args.reference]["losses"], r["losses"], window=args.smooth, abs_tol=args.abs_tol,
                          rel_tol=args.rel_tol)
            for name, r in by_name.items() if name != args.reference}


def verdict(compared: dict[str, Any]) -> dict[str, Any]:
    sr, plain = compared.get("bf16_sr"), compared.get("bf16_plain")
    out = {
        "bf16_sr_follows_fp32_master": sr["within_tolerance"] if sr else None,
        "bf16_plain_falls_behind": plain["behind"] if plain else None,
    }
    for name in ("lora_fp8_tensorwise", "lora_fp8_rowwise"):
        if name in compared:
            out[f"{name}_follows_lora_bf16"] = compared[name]["within_tolerance"]
    return out


def main(argv: list[str] | None = None) -> int:
    from recipe_runs import bench_model_and_tokenizer, gsm8k_overrides
    from train_throughput import _default_gsm8k

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gsm8k", type=Path, default=_default_gsm8k())
    parser.add_argument("--preset", default="llama3_2_1b")
    parser.add_argument("--arch", default="llama3_2_1b", help="the model's arch (random weights)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--reference", default=DEFAULT_REFERENCE,
                        help="the variant the others are compared with (lora_bf16 for the lora_* variants)")
    parser.add_argument("--lora-base-steps", type=int, default=100,
                        help="lora_* variants: full fine-tuning steps from random init that make their base")
    parser.add_argument("--lora-base-learning-rate", type=float, default=3e-4)
    parser.add_argument("--steps", type=int, default=None, help="steps per variant (default 150; tiny 16)")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--max-num-tokens", type=int, default=16384, help="tokens per step (rows of 2048)")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"])
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the preset's (2e-5)")
    parser.add_argument("--smooth", type=int, default=10, help="moving-average window of the compared loss")
    parser.add_argument("--abs-tol", type=float, default=0.02)
    parser.add_argument("--rel-tol", type=float, default=0.01)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="ft_tiny arch, short rows: the CPU smoke test")
    parser.add_argument("--extra", nargs="*", default=[], help="more key=value for --config, for every variant")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip variants that would not fit in this many seconds from the start; stop one at it")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if args.reference not in names:
        parser.error(f"--reference {args.reference} is not among --variants {args.variants}")
    if not args.gsm8k.is_file():
        parser.error(f"--gsm8k {args.gsm8k}: no such file (GSM8K's train.jsonl, question/answer rows)")
    steps = args.steps or (16 if args.tiny else 150)
    arch = "ft_tiny" if args.tiny else args.arch
    start = time.perf_counter()

    doc: dict[str, Any] = {
        "benchmark": "precision_curves", "preset": args.preset, "arch": arch, "tiny": args.tiny, "steps": steps,
        "optimizer": args.optimizer, "reference": args.reference, "smooth_window": args.smooth,
        "tolerance": f"|smoothed loss - {args.reference}'s| <= max({args.abs_tol}, {args.rel_tol} x {args.reference}'s) "
                     f"at every step of the second half",
        "results": [],
    }

    def write() -> None:
        doc["comparisons"] = comparisons(doc["results"], args)
        doc["verdict"] = verdict(doc["comparisons"])
        if args.out is not None:
            tmp_path = args.out.with_suffix(args.out.suffix + ".tmp")
            tmp_path.write_text(json.dumps(doc, indent=2) + "\n")
            os.replace(tmp_path, args.out)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cards, tokenizer = bench_model_and_tokenizer(tmp, arch=arch, gsm8k=args.gsm8k, tiny=args.tiny)
        seq, tokens = (256, 512) if args.tiny else (2048, args.max_num_tokens)
        overrides = [
            *gsm8k_overrides(tokenizer, args.gsm8k, seq_len=seq, max_num_tokens=tokens, steps=steps),
            f"warmup_steps={args.warmup_steps}", "publish_metrics_every_n_steps=1",
            f"checkpoint_every_n_steps={steps + 1}", "save_model_only=true", "dtype=bfloat16",
            f"optimizer={args.optimizer}", f"device={args.device}",
            *([f"learning_rate={args.learning_rate}"] if args.learning_rate is not None else []), *args.extra,
        ]
        # The output directory goes in at index 5 (run_variant), the variant's keys last.
        base = [sys.executable, "-m", "ft", "lm", "instruction_finetune", "--no-sweep-dir", "--preset", args.preset,
                "--config", *overrides]
        env = dict(os.environ, FT_USER_ASSET_DIR=str(cards), PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
        write()
        lora_base: list[str] = []
        if any(n.startswith("lora_") for n in names):
            # LoRA needs a base with weights: a short full fine-tuning run from random init makes one
            # that has learnt something, so the adapters train on a model whose top tokens are not ties.
            base_steps = args.lora_base_steps
            made = run_variant("lora_base", [
                "mixed_precision=true", f"max_num_steps={base_steps}", f"checkpoint_every_n_steps={base_steps}",
                f"learning_rate={args.lora_base_learning_rate}"], base, env, tmp / "lora_base", args.budget_s, keep=True)
            made.pop("effective_config", None)
            doc["lora_base"] = made
            step_dir = tmp / "lora_base" / "checkpoints" / f"step_{base_steps}"
            if made["status"] != "ok" or not step_dir.is_dir():
                print(f"lora_base {made['status']}: {made.get('stderr_tail', '')[-2000:]}", file=sys.stderr)
                write()
                return 1
            print(f"lora_base ok  steps {made['steps']}  final loss {made['losses'][-1]:.4f}  "
                  f"wall {made['wall_s']:.0f} s", file=sys.stderr, flush=True)
            lora_base = [f"model={step_dir}"]
        for name in names:
            elapsed = time.perf_counter() - start
            longest = max((r["wall_s"] for r in doc["results"] if "wall_s" in r), default=0.0)
            if args.budget_s is not None and elapsed + longest > args.budget_s:
                doc["results"].append({"name": name, "status": "skipped",
                                       "reason": f"{elapsed:.0f} s spent + {longest:.0f} s for a variant > "
                                                 f"budget of {args.budget_s:.0f} s"})
            else:
                timeout = args.budget_s - elapsed if args.budget_s is not None else None
                keys = [*VARIANTS[name], *(lora_base if name.startswith("lora_") else [])]
                doc["results"].append(run_variant(name, keys, base, env, tmp / f"out_{name}", timeout))
            r = doc["results"][-1]
            print(f"{name:<20} {r['status']:<8} " + (f"steps {r['steps']}  final loss {r['losses'][-1]:.4f}  "
                                                     f"tok/s {r['tokens_per_s'] or 0:,.0f}  wall {r['wall_s']:.0f} s"
                                                     if r.get("losses") else r.get("reason", r.get("error", ""))),
                  file=sys.stderr, flush=True)
            write()

    doc["wall_s"] = time.perf_counter() - start
    write()
    print(json.dumps({k: doc[k] for k in ("comparisons", "verdict", "tolerance")}, indent=2))
    return 1 if any(r["status"] == "error" for r in doc["results"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
