"""The memory model's prediction against the peaks measured by memory_savers.py runs,
as a Markdown table: the prediction is recomputed by the current
`ft.training.memory_model` from each result's recorded keys and workload (so a
model change can be checked against old measurements without a GPU).

    python3 benchmarks/memory_model_table.py docs/benchmark_results/.../savers_8b.json ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import memory_savers  # noqa: E402

from ft.models import find_arch  # noqa: E402
from ft.training.memory_model import GIB, parameter_shapes, predict_memory  # noqa: E402


def rows(path: Path) -> list[tuple[str, float, float]]:
    doc = json.loads(path.read_text())
    tokens = doc["workload"]["rows"] * doc["workload"]["seq_len"]
    # Older results do not record it: every GPU run compiled its blocks unless told --no-compile.
    compiled = doc.get("compiled", "--no-compile" not in doc["environment"]["command"])
    out = []
    for result in doc["results"]:
        if result.get("status") != "ok" or result.get("peak_memory_allocated_gib") is None:
            continue
        arch = result["name"].split("/")[0]
        config = find_arch(arch)[1]
        plan = memory_savers.memory_plan(config, result["keys"], tokens, compiled)
        predicted = predict_memory(plan, parameter_shapes(config)).peak / GIB
        out.append((result["name"], result["peak_memory_allocated_gib"], predicted))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    args = parser.parse_args(argv)
    print("| variant | measured peak | predicted | error |\n|---|---|---|---|")
    for path in args.results:
        for name, measured, predicted in rows(path):
            print(f"| {name} | {measured:.2f} GiB | {predicted:.2f} GiB | {100 * (predicted - measured) / measured:+.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
