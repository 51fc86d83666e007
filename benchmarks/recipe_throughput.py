"""The recipe itself as a benchmark row: `ft lm instruction_finetune` through its CLI
with a preset's GPU defaults on the 1B shape over GSM8K, steady-state tokens/s
from OUT/metrics/train.jsonl, and the loop's stall at a checkpoint.

    python3 benchmarks/recipe_throughput.py --out recipe.json                # one H200
    python3 benchmarks/recipe_throughput.py --tiny --device cpu --out t.json  # smoke test

Random weights (a card with the arch and no checkpoint), the GSM8K byte-level BPE of
train_throughput.py (workload c), and workload c's shapes (rows of 2048, 16384
tokens per step) so the number compares with `ft_mixed_compile_packed` /
`ft_bf16_compile_packed` of `train_throughput.py --workload c`. Steady state: the
median over publish windows after the first two (compilation, allocator growth).
Checkpoint stall: the window holding the save minus the median window (the save's pause
and the background writer's contention); `checkpoint_pauses_s`: the pauses the recipe logs.
Prints the result JSON and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv: list[str] | None = None) -> int:
    from recipe_runs import bench_model_and_tokenizer, gsm8k_overrides
    from train_throughput import _default_gsm8k

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gsm8k", type=Path, default=_default_gsm8k())
    parser.add_argument("--preset", default="llama3_2_1b")
    parser.add_argument("--arch", default="llama3_2_1b", help="the model's arch (random weights)")
    parser.add_argument("--max-num-tokens", type=int, default=16384, help="tokens per step (rows of 2048)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--publish-every", type=int, default=5)
    parser.add_argument("--checkpoint-at", type=int, default=40, help="step of the checkpoint whose stall is measured")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="ft_tiny arch, short rows: the CPU smoke test")
    parser.add_argument("--extra", nargs="*", default=[], help="more key=value for --config (e.g. mixed_precision=false)")
    parser.add_argument("--memory-cap-gb", type=float, default=None,
                        help="run the CLI under torch.cuda.set_per_process_memory_fraction of this many GB "
                             "(decimal; 24 = an RTX 4090), as memory_savers.py's capped variants")
    parser.add_argument("--profile-from", type=int, default=None, help="profile training steps from this one (>= 2)")
    parser.add_argument("--profile-steps", type=int, default=2, help="steps profiled")
    parser.add_argument("--profile-dir", type=Path, default=Path("recipe_profile"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.memory_cap_gb is not None:
        import torch

        if not torch.cuda.is_available():
            parser.error("--memory-cap-gb caps the CUDA allocator: it needs a GPU")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        arch = "ft_tiny" if args.tiny else args.arch
        cards, tokenizer = bench_model_and_tokenizer(tmp, arch=arch, gsm8k=args.gsm8k, tiny=args.tiny)
        seq, tokens = (256, 512) if args.tiny else (2048, args.max_num_tokens)
        overrides = [
            *gsm8k_overrides(tokenizer, args.gsm8k, seq_len=seq, max_num_tokens=tokens, steps=args.steps),
            f"publish_metrics_every_n_steps={args.publish_every}", f"checkpoint_every_n_steps={args.checkpoint_at}",
            f"device={args.device}", *(["dtype=float32"] if args.tiny else []), *args.extra,
        ]
        command = [*_python_for_cli(args), "lm", "instruction_finetune", str(tmp / "out"),
                   "--no-sweep-dir", "--preset", args.preset, "--config", *overrides]
        env = dict(os.environ, FT_USER_ASSET_DIR=str(cards), PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
        started = time.perf_counter()
        run = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if args.out is not None:  # the run's log (compile choices, TORCH_LOGS output) beside the result
            args.out.with_suffix(".stderr.txt").write_text(run.stderr)
        if run.returncode != 0:
            print(run.stderr[-4000:], file=sys.stderr)
            return run.returncode
        rows = [json.loads(line) for line in (tmp / "out" / "metrics" / "train.jsonl").read_text().splitlines()]
        dump = subprocess.run(command + ["--dump-config"], env=env, capture_output=True, text=True).stdout

    windows = [r for r in rows if "target_tokens_per_s" in r]
    steady = windows[2:] or windows
    # The recipe publishes before it saves, so the save lands in the window after checkpoint_at.
    save_window = next((r for r in windows if r.get("step", 0) > args.checkpoint_at), None)
    median_elapsed = statistics.median(r["elapsed_s"] for r in steady)
    result = {
        "benchmark": "recipe_throughput", "preset": args.preset, "arch": arch, "tiny": args.tiny,
        "command": " ".join(command), "effective_config": dump,
        "warmup_windows": [{k: r.get(k) for k in ("step", "target_tokens_per_s", "elapsed_s", "warmup_s")}
                           for r in windows[:2]],
        "warmup_s": next((r["warmup_s"] for r in rows if "warmup_s" in r), None),
        "first_line_target_tokens_per_s": windows[0]["target_tokens_per_s"] if windows else None,
        "steady_target_tokens_per_s": statistics.median(r["target_tokens_per_s"] for r in steady),
        "steady_tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "steady_mfu": statistics.median(r["mfu"] for r in steady) if all("mfu" in r for r in steady) else None,
        "checkpoint_stall_s": (save_window["elapsed_s"] - median_elapsed) if save_window else None,
        # what the recipe logs: the save's own pause, without the background writer's contention
        "checkpoint_pauses_s": [float(m) for m in re.findall(r"training paused ([\d.]+) s", run.stderr)],
        # parallel_plan=auto and the memory model: the prediction (first line) against the measured peak
        "predicted_peak_memory_gib": next((r["predicted_peak_memory_gib"] for r in rows
                                           if "predicted_peak_memory_gib" in r), None),
        "measured_peak_memory_gib": max((r["peak_memory_gib"] for r in rows if "peak_memory_gib" in r), default=None),
        "peak_reserved_memory_gib": max((r["peak_reserved_memory_gib"] for r in rows
                                         if "peak_reserved_memory_gib" in r), default=None),
        "alloc_retries": max((r["alloc_retries"] for r in rows if "alloc_retries" in r), default=None),
        "step_windows": [{k: r.get(k) for k in ("step", "tokens_per_s", "elapsed_s", "alloc_retries")}
                         for r in windows],
        "plan_lines": [line for line in (run.stdout + run.stderr).splitlines() if "parallel plan:" in line],
        "memory_cap_gb": args.memory_cap_gb,
        "wall_s": wall,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


def _python_for_cli(args: argparse.Namespace) -> list[str]:
    """`python -m ft`, or the same CLI capped and/or profiled (`cli_under_test.py`)."""
    if args.memory_cap_gb is None and args.profile_from is None:
        return [sys.executable, "-m", "ft"]
    wrapper = [sys.executable, str(ROOT / "benchmarks" / "cli_under_test.py")]
    if args.memory_cap_gb is not None:
        wrapper += ["--memory-cap-gb", str(args.memory_cap_gb)]
    if args.profile_from is not None:
        wrapper += ["--profile-from", str(args.profile_from), "--profile-steps", str(args.profile_steps),
                    "--profile-dir", str(args.profile_dir)]
    return [*wrapper, "--"]


if __name__ == "__main__":
    raise SystemExit(main())
