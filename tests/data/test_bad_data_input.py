"""Bad dataset input to a training run: a UTF-8 BOM is accepted; a lone surrogate,
100k-deep JSON, a device as dataset and an over-long line are each one line naming
the file (and line), a non-zero exit, no traceback, and the run's files untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import ft.data.jsonl as jsonl
from ft.cli import main
from tests.recipes.conftest import run_finetune

ROW = {"src": "Say hi.", "tgt": "hi"}


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*"))
            if p.is_file() and "logs" not in p.parts and p.name not in ("config.yaml", ".ft-run.lock")}


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FT_USER_ASSET_DIR", str(tmp_path_factory.mktemp("no_user_cards")))
        out = tmp_path_factory.mktemp("trained") / "run"
        assert run_finetune(out, "max_num_steps=2") == 0
    return out


@pytest.fixture
def user_assets(tmp_path, monkeypatch):
    """No card on this machine leaks into a test."""
    directory = tmp_path / "user_assets"
    directory.mkdir()
    monkeypatch.setenv("FT_USER_ASSET_DIR", str(directory))
    return directory


@pytest.fixture
def trained(trained_once, user_assets):
    return trained_once, snapshot(trained_once)


def bad_run(out: Path, capsys, *overrides: str) -> str:
    assert run_finetune(out, *overrides, "max_num_steps=4") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


def write(path: Path, *lines: str | bytes) -> Path:
    path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
    return path


def test_utf8_bom_is_accepted(tmp_path, user_assets):
    data = write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + json.dumps(ROW).encode(), *[json.dumps(ROW)] * 3)
    assert run_finetune(tmp_path / "run", f"dataset={data}", "max_num_steps=1") == 0
    assert "4 examples" in (tmp_path / "run" / "logs" / "rank_0.log").read_text()


def test_lone_surrogate(trained, tmp_path, capsys):
    out, before = trained
    data = write(tmp_path / "s.jsonl", json.dumps(ROW), '{"src": "a\\ud800b", "tgt": "c"}')
    line = bad_run(out, capsys, f"dataset={data}")
    assert f"{data}:2: not valid Unicode (a lone UTF-16 surrogate" in line
    assert "(set skip_malformed_lines=true to skip such lines)" in line
    assert snapshot(out) == before


def test_json_nested_100k_deep(trained, tmp_path, capsys):
    out, before = trained
    data = write(tmp_path / "deep.jsonl", json.dumps(ROW), '{"src": ' + "[" * 100_000 + "]" * 100_000 + ', "tgt": "x"}')
    line = bad_run(out, capsys, f"dataset={data}")
    assert f"{data}:2: JSON nested too deeply" in line
    assert snapshot(out) == before


def test_device_as_dataset(trained, capsys):
    out, before = trained
    line = bad_run(out, capsys, "dataset=/dev/null")
    assert "dataset /dev/null is neither a file nor a directory" in line
    assert snapshot(out) == before


def test_over_long_line_is_refused_before_parsing(trained, tmp_path, capsys, monkeypatch):
    out, before = trained
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 4096)  # stands for the real 16 MiB
    data = write(tmp_path / "long.jsonl", json.dumps(ROW), json.dumps({"src": "x" * 10_000, "tgt": "y"}),
                 json.dumps(ROW))

    real_loads = json.loads

    def no_parse(text, *args, **kwargs):
        assert len(text) < 4096, "the long line reached the JSON parser"
        return real_loads(text, *args, **kwargs)

    monkeypatch.setattr(jsonl.json, "loads", no_parse, raising=True)
    line = bad_run(out, capsys, f"dataset={data}")
    assert f"{data}:2: line longer than" in line
    assert snapshot(out) == before


def test_skipping_bad_lines_trains_on_the_rest(tmp_path, user_assets):
    data = write(tmp_path / "mixed.jsonl", b"\xef\xbb\xbf" + json.dumps(ROW).encode(),
                 '{"src": "\\udc00", "tgt": "c"}', "[" * 100_000, json.dumps(ROW))
    assert run_finetune(tmp_path / "run", f"dataset={data}", "skip_malformed_lines=true", "max_num_steps=1") == 0
    assert "2 malformed lines skipped" in (tmp_path / "run" / "logs" / "rank_0.log").read_text()


def test_generate_names_no_key_it_lacks(tmp_path, user_assets, capsys, trained_once):
    data = write(tmp_path / "p.jsonl", '{"src": "\\ud800"}')
    code = main(["lm", "generate", str(tmp_path / "gen"), "--no-sweep-dir", "--config",
                 f"checkpoint_dir={trained_once / 'checkpoints'}", "model=last_checkpoint", f"dataset={data}"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"{data}:1: not valid Unicode" in err and "skip_malformed" not in err
