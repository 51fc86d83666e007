"""Bad input to `ft lm instruction_finetune`: one clear message, a non-zero exit,
and every file an earlier run wrote left as it was."""

import hashlib
import json
from pathlib import Path

import pytest

from tests.recipes.conftest import run_finetune


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and "logs" not in p.parts and p.name != "config.yaml"
    }


@pytest.fixture
def trained(tmp_path, user_assets):
    """A finished 2-step run whose checkpoints must survive every bad re-run."""
    out = tmp_path / "run"
    assert run_finetune(out, "max_num_steps=2") == 0
    return out, snapshot(out / "checkpoints")


def bad_run(out: Path, capsys, *overrides: str) -> str:
    code = run_finetune(out, *overrides)
    assert code != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [l for l in err.splitlines() if l.startswith("error: ")]
    return line


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_malformed_line_names_file_and_line(trained, tmp_path, capsys):
    out, before = trained
    data = write_jsonl(tmp_path / "broken.jsonl", [{"src": "a", "tgt": "b"}, {"src": "c", "tgt": "d"}, "{not json"])
    message = bad_run(out, capsys, f"dataset={data}", "max_num_steps=4")
    assert "broken.jsonl:3" in message
    assert snapshot(out / "checkpoints") == before


def test_skip_malformed_lines_trains_on_the_rest(tmp_path, user_assets):
    data = write_jsonl(tmp_path / "broken.jsonl", [{"src": "a", "tgt": "b"}, "{not json", {"src": "c", "tgt": "d"}])
    assert run_finetune(tmp_path / "run", f"dataset={data}", "skip_malformed_lines=true", "max_num_steps=1") == 0
    assert "1 malformed lines skipped" in (tmp_path / "run" / "logs" / "rank_0.log").read_text()


def test_empty_dataset(trained, tmp_path, capsys):
    out, before = trained
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    message = bad_run(out, capsys, f"dataset={empty}", "max_num_steps=4")
    assert "empty.jsonl" in message
    assert snapshot(out / "checkpoints") == before


def test_missing_dataset_path(trained, tmp_path, capsys):
    out, before = trained
    message = bad_run(out, capsys, f"dataset={tmp_path / 'nowhere' / 'data.jsonl'}", "max_num_steps=4")
    assert "nowhere" in message and "does not exist" in message
    assert snapshot(out / "checkpoints") == before


def test_examples_longer_than_max_seq_len(tmp_path, user_assets, capsys):
    long_row = {"src": "Count to two hundred.", "tgt": " ".join(str(i) for i in range(200))}
    data = write_jsonl(tmp_path / "long.jsonl", [long_row] * 4)
    message = bad_run(tmp_path / "dropped", capsys, f"dataset={data}", "max_num_steps=1")
    assert "longer than max_seq_len" in message
    # Truncated instead, each keeps its prompt and the start of its answer, and trains.
    assert run_finetune(tmp_path / "kept", f"dataset={data}", "max_num_steps=1", "example_too_long=truncate") == 0
    assert "4 truncated to max_seq_len" in (tmp_path / "kept" / "logs" / "rank_0.log").read_text()


def test_unknown_card(trained, capsys):
    out, before = trained
    message = bad_run(out, capsys, "model=no_such_model", "max_num_steps=4")
    assert "no_such_model" in message
    assert snapshot(out / "checkpoints") == before


def test_incompatible_resume_keeps_the_checkpoint(trained, user_assets, capsys):
    out, before = trained
    (user_assets / "other.yaml").write_text(
        "name: other_tiny\nbase: ft_tiny\nmodel_config: {n_layers: 2}\n"
    )
    message = bad_run(out, capsys, "model=other_tiny", "max_num_steps=4")
    assert "different model" in message and "n_layers" in message
    assert snapshot(out / "checkpoints") == before


def test_resume_from_a_checkpoint_name_that_does_not_exist(trained, tmp_path, capsys):
    out, _ = trained
    message = bad_run(tmp_path / "new", capsys, f"resume_checkpoint_dir={out / 'checkpoints'}",
                      "model=checkpoint_step_7")
    assert "checkpoint_step_2" in message and "last_checkpoint" in message


def test_sequence_parallel_with_pipeline_stages_fails_before_any_work(tmp_path, user_assets, capsys):
    out = tmp_path / "run"
    message = bad_run(out, capsys, "sequence_parallel=true", "tensor_parallel_size=2", "pipeline_parallel_size=2",
                      "gradient_accumulation=2")
    assert "'sequence_parallel'" in message and "'pipeline_parallel_size'" in message
    assert "use sequence_parallel=false" in message
    assert not (out / "checkpoints").exists() and not (out / "metrics").exists()
