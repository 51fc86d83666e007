"""GSM8K-shaped rows (question, worked answer ending in `#### N`) for the benchmarks'
smoke tests, so they never need the real file."""

from __future__ import annotations

import json
import random
from pathlib import Path


def write_gsm8k_like(path: Path, n: int) -> None:
    rng = random.Random(0)
    words = "apples pencils friends dollars minutes books cookies marbles stickers hours".split()
    with open(path, "w") as f:
        for _ in range(n):
            a, b, w = rng.randint(2, 99), rng.randint(2, 99), rng.choice(words)
            question = f"Tom has {a} {w}. He buys {b} more {w}. " * rng.randint(1, 3) + f"How many {w} does he have?"
            steps = "\n".join(f"Step: {a}+{b} = <<{a}+{b}={a + b}>>{a + b} {w}." for _ in range(rng.randint(1, 4)))
            f.write(json.dumps({"question": question, "answer": f"{steps}\n#### {a + b}"}) + "\n")
