"""`ft lm generate` end to end on CPU: a tiny random checkpoint in a run's
checkpoints dir (HF layout + tokenizer.json, as training writes it), GSM8K-style
and chat datasets; outputs, metrics and the errors users will meet."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from generation_helpers import make_run_dir

from ft.cli import main
from ft.generation import GeneratorConfig, generate
from ft.models import load_model
from ft.tokenizers import load_tokenizer

transformers = pytest.importorskip("transformers")

GSM8K_ROWS = [
    {"question": "Janet has 3 apples and buys 5 more. How many apples?", "answer": "3 + 5 = 8\n#### 8"},
    {"question": "What is 2 + 2?", "answer": "#### 4"},
    {"question": "A farm has 1,200 cows and sells 200. How many are left?", "answer": "#### 1,000"},
]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return make_run_dir(tmp_path)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_generate_cli_writes_outputs_and_metrics(run_dir, tmp_path):
    dataset = write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS)
    save = tmp_path / "gen"
    result = subprocess.run(
        [
            sys.executable, "-m", "ft.cli", "lm", "generate", str(save), "--no-sweep-dir", "--config",
            f"checkpoint_dir={run_dir / 'checkpoints'}", "model=last_checkpoint", f"dataset={dataset}",
            "generator_config.greedy=true", "generator_config.max_gen_len=10", "generator_config.batch_size=2",
        ],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    records = read_jsonl(save / "output" / "rank_0.jsonl")
    assert [r["id"] for r in records] == ["0", "1", "2"]  # dataset order
    assert [r["prompt"].strip() for r in records] == [row["question"] for row in GSM8K_ROWS]
    assert [r["reference"] for r in records] == [row["answer"] for row in GSM8K_ROWS]
    assert [r["expected_answer"] for r in records] == ["8", "4", "1000"]

    # The responses are what the Python API gives for the same prompts.
    step_dir = run_dir / "checkpoints" / "step_3"
    tokenizer = load_tokenizer(str(step_dir))
    model = load_model(step_dir, dtype=torch.float32)
    api = generate(model, tokenizer, [r["prompt_token_ids"] for r in records], GeneratorConfig(greedy=True, max_gen_len=10))
    for record, out in zip(records, api):
        assert record["prompt_token_ids"] == tokenizer.encode_prompt(record["prompt"])
        assert record["token_ids"] == out.tokens and record["response"] == out.text
        assert len(record["logprobs"]) == len(record["token_ids"])
        assert record["finish_reason"] in ("stop", "length")

    metrics = json.loads((save / "metrics" / "generate.json").read_text())
    expected_accuracy = sum(r["correct"] for r in records) / 3
    assert metrics["num_rows"] == 3 and metrics["num_with_answer"] == 3
    assert metrics["accuracy"] == pytest.approx(expected_accuracy)
    assert metrics["num_generated_tokens"] == sum(len(r["token_ids"]) for r in records)
    assert "accuracy" in result.stdout and "over 3 numeric answers" in result.stdout
    text = (save / "output" / "rank_0.txt").read_text()
    assert GSM8K_ROWS[2]["question"] in text and "vs 1000" in text
    assert text.index("=== 0 ===") < text.index("=== 1 ===") < text.index("=== 2 ===")
    assert (save / "config.yaml").is_file() and (save / "logs" / "rank_0.log").is_file()


def test_generate_chat_rows_with_a_model_path_and_sampling(run_dir, tmp_path, capsys):
    step_dir = run_dir / "checkpoints" / "step_3"
    rows = [
        {"id": "a", "messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "#### 4"}]},
        {"id": "b", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    ]
    dataset = write_jsonl(tmp_path / "chat.jsonl", rows)
    args = [
        "lm", "generate", str(tmp_path / "gen"), "--no-sweep-dir", "--config", f"model={step_dir}",
        f"dataset={dataset}", "generator_config.max_gen_len=6", "generator_config.temperature=0.8",
        "generator_config.top_k=20", "generator_config.echo_prompt=true", "generator_config.seed=11",
    ]
    assert main(args) == 0
    first = read_jsonl(tmp_path / "gen" / "output" / "rank_0.jsonl")
    tokenizer = load_tokenizer(str(step_dir))
    chat_ids, _ = tokenizer.encode_chat(rows[0]["messages"][:1], add_generation_prompt=True)
    assert first[0]["prompt_token_ids"] == chat_ids  # the chat template, with the generation prompt
    assert [r["id"] for r in first] == ["a", "b"]
    assert "reference" in first[0] and "reference" not in first[1]
    assert first[0]["response"].startswith(tokenizer.decode(chat_ids))  # echo_prompt
    # Same seed, same samples.
    assert main(args[:2] + [str(tmp_path / "gen2")] + args[3:]) == 0
    second = read_jsonl(tmp_path / "gen2" / "output" / "rank_0.jsonl")
    assert [r["token_ids"] for r in second] == [r["token_ids"] for r in first]


def test_missing_checkpoint_name_lists_the_available_ones(run_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS)
    code = main([
        "lm", "generate", str(tmp_path / "gen"), "--no-sweep-dir", "--config",
        f"checkpoint_dir={run_dir / 'checkpoints'}", "model=checkpoint_step_7", f"dataset={dataset}",
    ])
    err = capsys.readouterr().err
    assert code != 0
    assert "checkpoint_step_7" in err and "checkpoint_step_3" in err and "last_checkpoint" in err
    assert "Traceback" not in err


def test_empty_prompt_file_is_a_clear_error(run_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = main([
        "lm", "generate", str(tmp_path / "gen"), "--no-sweep-dir", "--config",
        f"model={run_dir / 'checkpoints' / 'step_3'}", f"dataset={empty}",
    ])
    err = capsys.readouterr().err
    assert code != 0 and "empty" in err and str(empty) in err
    assert "Traceback" not in err


def test_more_tensor_parallel_ranks_than_processes_is_a_clear_error(run_dir, tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS)
    code = main([
        "lm", "generate", str(tmp_path / "gen"), "--no-sweep-dir", "--config",
        f"model={run_dir / 'checkpoints' / 'step_3'}", f"dataset={dataset}", "tensor_parallel_size=2",
    ])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    # Says what is wrong with which value, against how many processes there are.
    assert re.search(r"tensor_parallel_size=2 does not divide the 1 process", err), err
