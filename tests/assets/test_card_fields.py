"""An unknown field in an asset card (a typo such as `chekpoint:`) is an error
naming the field, the card and the closest known field, never silently ignored."""

from __future__ import annotations

import pytest

from ft.assets import load_card
from ft.cli import main
from ft.errors import AssetError


@pytest.fixture
def user_cards(tmp_path, monkeypatch):
    directory = tmp_path / "user"
    directory.mkdir()
    monkeypatch.setenv("FT_USER_ASSET_DIR", str(directory))
    return directory


def test_typo_names_the_field_and_the_closest_known_one(user_cards):
    (user_cards / "mine.yaml").write_text("name: mine\nbase: ft_tiny\nchekpoint: weights/\n")
    with pytest.raises(AssetError) as caught:
        load_card("mine")
    text = str(caught.value)
    assert "mine.yaml" in text and "card 'mine'" in text
    assert "unknown field 'chekpoint'" in text and "did you mean 'checkpoint'?" in text


def test_unrelated_field_lists_the_known_ones(user_cards):
    (user_cards / "mine.yaml").write_text("name: mine\nbase: ft_tiny\nwibble: 3\n")
    with pytest.raises(AssetError, match="unknown field 'wibble'; known fields: name, base, model_family"):
        load_card("mine")


def test_cli_gives_one_line_and_a_non_zero_exit(user_cards, tmp_path, capsys):
    (user_cards / "mine.yaml").write_text("name: mine\nbase: ft_tiny\nmodel_confg: {n_layers: 1}\n")
    assert main(["lm", "instruction_finetune", str(tmp_path / "out"), "--config", "model=mine"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "unknown field 'model_confg'" in line and "did you mean 'model_config'?" in line
