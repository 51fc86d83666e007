"""`ft llama write_hf_config [--model NAME] DIR`: the recorded config by default, a
family name checked against it, and a model card resolved as training resolves it."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from ft.errors import FtError
from ft.models import find_arch
from ft.models.build import create_model
from ft.models.cli import write_hf_config_command
from ft.models.hf_export import save_hf_model

SMALL = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=256)


def run(argv: list[str]) -> int:
    command = write_hf_config_command("llama")
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv)) or 0


@pytest.fixture
def step_dir(tmp_path, monkeypatch):
    """An ft-like step dir of a llama3_2_1b shrunk by a `llama3_2_1b@user` card."""
    user = tmp_path / "cards"
    user.mkdir()
    monkeypatch.setenv("FT_USER_ASSET_DIR", str(user))
    (user / "mine.yaml").write_text("name: llama3_2_1b@user\nmodel_config:\n"
                                    + "".join(f"  {k}: {v}\n" for k, v in SMALL.items()))
    config = dataclasses.replace(find_arch("llama3_2_1b")[1], **SMALL)
    model = create_model(config, device="cpu", dtype=torch.float32, seed=0, initialize=True)
    directory = tmp_path / "step_10"
    save_hf_model(model, directory, dtype=torch.bfloat16)
    (directory / "trainer").mkdir()
    (directory / "trainer" / "model_config.json").write_text(json.dumps(dataclasses.asdict(config)))
    return directory, config


def hidden_size(directory) -> int:
    return json.loads((directory / "config.json").read_text())["hidden_size"]


def test_model_is_optional_and_a_family_name_is_checked(step_dir):
    directory, _ = step_dir
    assert run([str(directory)]) == 0 and hidden_size(directory) == 64
    (directory / "config.json").unlink()  # the trainer state's model_config.json still records it
    assert run([str(directory)]) == 0 and hidden_size(directory) == 64
    for family_name in ("llama3", "llama"):
        (directory / "config.json").unlink()
        assert run(["--model", family_name, str(directory)]) == 0 and hidden_size(directory) == 64
    assert json.loads((directory / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_model_card_wins_over_the_builtin_arch(step_dir):
    directory, _ = step_dir
    # The user's card shrinks llama3_2_1b; training used the card, so must the export.
    assert run(["--model", "llama3_2_1b", str(directory)]) == 0 and hidden_size(directory) == 64


def test_other_family_and_unknown_names_fail(step_dir, monkeypatch):
    directory, _ = step_dir
    with pytest.raises(FtError, match="llama9"):
        run(["--model", "llama9", str(directory)])
    with pytest.raises(FtError, match="does not fit|embed_tokens|shape"):
        run(["--model", "ft_tiny", str(directory)])
