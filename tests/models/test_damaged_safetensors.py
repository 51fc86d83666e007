"""A truncated or garbage safetensors file, wherever ft reads one (a card's
checkpoint, model=DIR, write_hf_config), is one line naming the file, a non-zero
exit and nothing written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from ft.cli import main
from ft.models import build_model
from ft.models.hf_export import save_hf_model


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(params=["truncated", "garbage"])
def damaged_dir(request, tmp_path):
    directory = tmp_path / "ckpt"
    save_hf_model(build_model("ft_tiny", device="cpu", seed=0), directory, dtype=torch.float32)
    (weights,) = directory.glob("*.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if request.param == "truncated" else b"\x00" * 4096)
    return directory, weights


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


def test_write_hf_config_names_the_file(damaged_dir, capsys):
    directory, weights = damaged_dir
    before = snapshot(directory)
    assert main(["llama", "write_hf_config", "--model", "ft_tiny", str(directory)]) == 1
    line = one_error_line(capsys)
    assert str(weights) in line and "not a readable safetensors file" in line
    assert snapshot(directory) == before


def test_model_dir_names_the_file(damaged_dir, tmp_path, capsys, monkeypatch):
    directory, weights = damaged_dir
    monkeypatch.setenv("FT_USER_ASSET_DIR", str(tmp_path / "no_cards"))
    before = snapshot(directory)
    code = main(["lm", "instruction_finetune", str(tmp_path / "out"), "--no-sweep-dir", "--config",
                 f"model={directory}", f"tokenizer=ft_tiny", "max_num_steps=1", "max_seq_len=64", "max_num_tokens=128"])
    assert code == 1
    assert str(weights) in one_error_line(capsys)
    assert snapshot(directory) == before
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_card_checkpoint_names_the_file(damaged_dir, tmp_path, capsys, monkeypatch):
    directory, weights = damaged_dir
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "broken.yaml").write_text(f"name: broken_tiny\nbase: ft_tiny\ncheckpoint: {directory}\n")
    monkeypatch.setenv("FT_USER_ASSET_DIR", str(cards))
    code = main(["lm", "generate", str(tmp_path / "gen"), "--no-sweep-dir", "--config", "model=broken_tiny"])
    assert code == 1
    assert str(weights) in one_error_line(capsys)
