"""`resolve_card_or_path`: the one rule that tells a card name from a path."""

import os
from pathlib import Path

import pytest

from ft.assets import AssetCard, AssetStore, is_explicit_path, resolve_card_or_path
from ft.errors import AssetError


@pytest.fixture
def store(tmp_path):
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "c.yaml").write_text("name: mydata\ndata: d.jsonl\n---\nname: mydata@user\ndataset_family: chat\n"
                                  "---\nname: orphan@user\ndata: x\n")
    return AssetStore([cards])


@pytest.mark.parametrize(
    "value, is_path",
    [
        ("mydata", False),
        ("mydata@user", False),
        ("llama3_2_1b", False),
        ("train.jsonl", False),  # no such file here: a card name (the error says how to write a path)
        ("./train.jsonl", True),
        ("data/train.jsonl", True),
        ("~/x", True),
        (".hidden", True),
        (Path("plain"), True),  # a PathLike is always a path
    ],
)
def test_is_explicit_path(value, is_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_explicit_path(value) is is_path


def test_existing_relative_name_is_a_path(tmp_path, monkeypatch, store):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    assert is_explicit_path("mydata")
    assert resolve_card_or_path("mydata", store=store) == Path("mydata")


def test_card_name_gives_the_merged_card(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    card = resolve_card_or_path("mydata", store=store)
    assert isinstance(card, AssetCard) and card.name == "mydata"
    assert card.get("dataset_family") == "chat"  # the @user overlay is merged in
    # `x@user` names card x with its overlay, not the overlay alone.
    assert resolve_card_or_path("mydata@user", store=store).fields == card.fields


def test_path_is_expanded(tmp_path, monkeypatch, store):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "f.jsonl").write_text("{}\n")
    assert resolve_card_or_path("~/f.jsonl", store=store) == tmp_path / "f.jsonl"


def test_errors(tmp_path, monkeypatch, store):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssetError, match=f"dataset path {tmp_path / 'nope'} does not exist"):
        resolve_card_or_path(str(tmp_path / "nope"), what="dataset", store=store)
    with pytest.raises(AssetError, match=r"tokenizer 'mydat' is neither an existing file or directory nor a known "
                                         r"asset card: no asset card named 'mydat'; did you mean 'mydata'"):
        resolve_card_or_path("mydat", what="tokenizer", store=store)
    with pytest.raises(AssetError, match=r"no asset card named 'x.jsonl'.*\(for a file or directory of that name, write ./x.jsonl\)"):
        resolve_card_or_path("x.jsonl", store=store)
    with pytest.raises(AssetError, match=r"card 'orphan@user' in .* overlays card 'orphan', but no card has that name"):
        resolve_card_or_path("orphan@user", store=store)


def test_os_sep_counts_as_a_separator():
    assert is_explicit_path(f"a{os.sep}b")
