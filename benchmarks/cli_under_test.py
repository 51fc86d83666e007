"""ft's CLI in a process prepared for a benchmark: the CUDA allocator capped first
(`--memory-cap-gb`, as an RTX 4090's 24 GB), and/or torch.profiler over training steps
`--profile-from` .. +`--profile-steps` (the profiler is stepped from the recipe's progress
bar, `TrainingProgress.advance`, once per optimizer step; the recipe itself is unchanged).
The window's top ops by device time go to DIR/ops.txt, its timeline to DIR/trace.json.gz.

    python3 benchmarks/cli_under_test.py --memory-cap-gb 24 -- lm instruction_finetune OUT --config ...
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
from pathlib import Path


def profile_steps(first: int, count: int, directory: Path) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from ft.training import progress

    directory.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()

    def write(prof) -> None:
        table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=60,
                                          max_name_column_width=100)
        (directory / "ops.txt").write_text(f"steps {first}..{first + count - 1}\n{table}\n")
        raw = directory / "trace.json"
        prof.export_chrome_trace(str(raw))
        with raw.open("rb") as src, gzip.open(directory / "trace.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()

    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                   schedule=schedule(skip_first=first - 2, wait=0, warmup=1, active=count, repeat=1),
                   on_trace_ready=write)
    prof.start()
    advance = progress.TrainingProgress.advance

    def advance_and_step(self, step):
        advance(self, step)
        prof.step()

    progress.TrainingProgress.advance = advance_and_step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-cap-gb", type=float, default=None)
    parser.add_argument("--profile-from", type=int, default=None, help="first profiled step (>= 2)")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--profile-dir", type=Path, default=None)
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="-- then ft's arguments")
    args = parser.parse_args()
    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    if args.memory_cap_gb is not None:
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.memory_cap_gb * 1e9 / total)
    if args.profile_from is not None:
        profile_steps(args.profile_from, args.profile_steps, args.profile_dir)
    from ft.cli import main as ft_main

    sys.argv[0] = "ft"
    return ft_main(cli)


if __name__ == "__main__":
    raise SystemExit(main())
