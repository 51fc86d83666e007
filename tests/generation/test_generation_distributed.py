"""`ft lm generate` on 2 gloo processes: data-parallel ranks split the dataset (their
files together equal one process's output) and tensor parallel (tp=2) generates
what one process generates; metrics are summed over ranks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from generation_helpers import make_run_dir

from ft.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from dist_launcher import run_distributed  # noqa: E402

ROWS = [{"question": f"What is {i} + {i % 3}?", "answer": f"#### {i + i % 3}"} for i in range(5)]


def _args(run_dir: Path, dataset: Path, save: Path, *extra: str) -> list[str]:
    return [
        "lm", "generate", str(save), "--no-sweep-dir", "--config", f"model={run_dir / 'checkpoints' / 'step_3'}",
        f"dataset={dataset}", "generator_config.greedy=true", "generator_config.max_gen_len=6",
        "generator_config.batch_size=2", *extra,
    ]


def _worker(rank: int, args: list[str]) -> None:
    assert main(args) == 0


def _records(save: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (save / "output" / f"rank_{rank}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    run_dir = make_run_dir(root)
    dataset = root / "test.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    single = root / "single"
    assert main(_args(run_dir, dataset, single)) == 0
    return run_dir, dataset, single


def test_data_parallel_ranks_split_the_dataset(setup, tmp_path):
    run_dir, dataset, single = setup
    save = tmp_path / "dp2"
    run_distributed(_worker, 2, _args(run_dir, dataset, save))
    first, second = _records(save, 0), _records(save, 1)
    assert [r["id"] for r in first] == ["0", "1", "2"] and [r["id"] for r in second] == ["3", "4"]
    expected = _records(single, 0)
    assert [r["token_ids"] for r in first + second] == [r["token_ids"] for r in expected]
    metrics = json.loads((save / "metrics" / "generate.json").read_text())
    single_metrics = json.loads((single / "metrics" / "generate.json").read_text())
    for key in ("num_rows", "num_with_answer", "accuracy", "exact_match", "num_generated_tokens"):
        assert metrics[key] == single_metrics[key], key
    assert (save / "logs" / "rank_1.log").is_file()


def test_tensor_parallel_generates_what_one_process_does(setup, tmp_path):
    run_dir, dataset, single = setup
    save = tmp_path / "tp2"
    run_distributed(_worker, 2, _args(run_dir, dataset, save, "tensor_parallel_size=2"))
    assert not (save / "output" / "rank_1.jsonl").exists()  # one dp rank: one file
    got, expected = _records(save, 0), _records(single, 0)
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in expected]
    for g, e in zip(got, expected):
        assert g["logprobs"] == pytest.approx(e["logprobs"], abs=1e-4)
    assert json.loads((save / "metrics" / "generate.json").read_text())["num_rows"] == len(ROWS)
