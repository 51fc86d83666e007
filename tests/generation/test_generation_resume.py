"""A killed `ft lm generate` keeps the prompts it finished, and re-running the same
command generates only the rest, ending with the outputs of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from generation_helpers import make_run_dir

import ft.recipes.generate as generate_recipe
from ft.cli import main

ROWS = [{"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"} for i in range(5)]


def _args(run_dir: Path, dataset: Path, save: Path) -> list[str]:
    return ["lm", "generate", str(save), "--no-sweep-dir", "--config", f"checkpoint_dir={run_dir / 'checkpoints'}",
            "model=last_checkpoint", f"dataset={dataset}", "generator_config.greedy=true",
            "generator_config.max_gen_len=6", "generator_config.batch_size=2"]


def test_killed_generation_keeps_finished_prompts_and_a_rerun_continues(tmp_path, monkeypatch):
    run_dir = make_run_dir(tmp_path)
    dataset = tmp_path / "test.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert main(_args(run_dir, dataset, tmp_path / "full")) == 0
    full = (tmp_path / "full" / "output" / "rank_0.jsonl").read_text()
    assert not (tmp_path / "full" / "output" / "rank_0.partial.jsonl").exists()

    real_generate = generate_recipe.generate
    asked: list[int] = []

    def killed_after_one_batch(model, tokenizer, prompts, config, *, on_batch, **kwargs):
        asked.append(len(prompts))

        def then_kill(batch):
            on_batch(batch)
            raise KeyboardInterrupt

        return real_generate(model, tokenizer, prompts, config, on_batch=then_kill, **kwargs)

    save = tmp_path / "gen"
    monkeypatch.setattr(generate_recipe, "generate", killed_after_one_batch)
    assert main(_args(run_dir, dataset, save)) == 130
    partial = save / "output" / "rank_0.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 1 + 2  # the header and the first batch
    assert not (save / "output" / "rank_0.jsonl").exists()

    def counting(model, tokenizer, prompts, config, **kwargs):
        asked.append(len(prompts))
        return real_generate(model, tokenizer, prompts, config, **kwargs)

    monkeypatch.setattr(generate_recipe, "generate", counting)
    with open(partial, "a") as file:
        file.write('{"index": 4, "id": "4", "resp')  # a line torn by the kill
    assert main(_args(run_dir, dataset, save)) == 0
    assert asked == [5, 3]  # the re-run generated only the three unfinished prompts
    assert (save / "output" / "rank_0.jsonl").read_text() == full
    assert not partial.exists()
    metrics = json.loads((save / "metrics" / "generate.json").read_text())
    assert metrics["num_rows"] == 5


def test_outputs_of_another_config_are_not_reused(tmp_path):
    run_dir = make_run_dir(tmp_path)
    dataset = tmp_path / "test.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    save = tmp_path / "gen"
    (save / "output").mkdir(parents=True)
    (save / "output" / "rank_0.partial.jsonl").write_text(
        '{"ft_partial_outputs": "another"}\n{"index": 0, "id": "0", "response": "stale"}\n')
    assert main(_args(run_dir, dataset, save)) == 0
    records = [json.loads(line) for line in (save / "output" / "rank_0.jsonl").read_text().splitlines()]
    assert len(records) == 5 and records[0]["response"] != "stale"
