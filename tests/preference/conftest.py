"""Shared helpers of the preference tests: a tiny model on one thread, synthetic pairs."""

import json
import random
from pathlib import Path

import pytest
import torch

WORDS = ["red", "green", "blue", "cat", "dog", "sun", "tree", "fish"]


@pytest.fixture
def one_thread():
    # 2-thread OpenMP on a shared 2-core machine spends most of its time spinning;
    # the tiny model is 10-40x faster on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_copy_pairs(path: Path, n: int, *, seed: int = 0, chat: bool = False) -> Path:
    """Pairs of a copy task: the chosen response repeats the prompt's word, the rejected one another word."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            word = rng.choice(WORDS)
            wrong = rng.choice([w for w in WORDS if w != word])
            if chat:
                row = {"prompt": [{"role": "user", "content": f"Repeat: {word}"}],
                       "chosen": [{"role": "assistant", "content": word}],
                       "rejected": [{"role": "assistant", "content": wrong}]}
            else:
                row = {"src": f"Repeat: {word}\n", "tgt_chosen": word, "tgt_rejected": wrong}
            f.write(json.dumps(row) + "\n")
    return path
