"""`load_tokenizer`: cards, paths, directories, family guessing and errors."""

from __future__ import annotations

import shutil

import pytest

from ft.errors import AssetError
from ft.tokenizers import load_tokenizer
from ft.tokenizers.llama3 import Llama3Tokenizer
from ft.tokenizers.sentencepiece import SentencePieceTokenizer


@pytest.fixture
def card_dir(tmp_path, monkeypatch, tiktoken_file, sentencepiece_file):
    """A user asset directory with tokenizer cards whose paths are relative to the card file."""
    shutil.copyfile(tiktoken_file, tmp_path / "llama3.model")
    shutil.copyfile(sentencepiece_file, tmp_path / "llama2.model")
    (tmp_path / "tokenizers.yaml").write_text(
        "name: tiny_llama3\n"
        "tokenizer: llama3.model\n"
        "tokenizer_family: llama3\n"
        "---\n"
        "name: tiny_llama3_instruct\n"
        "base: tiny_llama3\n"
        "use_eot: true\n"
        "---\n"
        "name: tiny_llama2\n"
        "tokenizer: llama2.model\n"
        "tokenizer_family: llama2\n"
        "---\n"
        "name: bad_family\n"
        "tokenizer: llama2.model\n"
        "tokenizer_family: gpt2\n"
        "---\n"
        "name: no_tokenizer\n"
        "model_arch: x\n"
    )
    monkeypatch.setenv("FT_USER_ASSET_DIR", str(tmp_path))
    return tmp_path


def test_card_gives_family_path_and_use_eot(card_dir):
    base = load_tokenizer("tiny_llama3")
    assert isinstance(base, Llama3Tokenizer)
    assert base.path == card_dir / "llama3.model"
    assert base.encode_response("x")[-1] == base.eos_id

    instruct = load_tokenizer("tiny_llama3_instruct")
    assert instruct.use_eot and instruct.encode_response("x")[-1] == instruct.eot_id

    assert isinstance(load_tokenizer("tiny_llama2"), SentencePieceTokenizer)


def test_card_errors(card_dir):
    with pytest.raises(
        AssetError, match=r"card 'bad_family': tokenizer_family: unknown tokenizer family 'gpt2'; registered: hf, llama2, llama3"
    ):
        load_tokenizer("bad_family")
    with pytest.raises(AssetError, match="card 'no_tokenizer' has no 'tokenizer' field"):
        load_tokenizer("no_tokenizer")
    with pytest.raises(AssetError, match="no asset card named 'tiny_lama2'.*tiny_llama2"):
        load_tokenizer("tiny_lama2")


def test_directories_and_guessing(tmp_path, tiktoken_file, sentencepiece_file):
    (tmp_path / "l3" / "original").mkdir(parents=True)
    shutil.copyfile(tiktoken_file, tmp_path / "l3" / "original" / "tokenizer.model")
    (tmp_path / "l2").mkdir()
    shutil.copyfile(sentencepiece_file, tmp_path / "l2" / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path / "l3"), Llama3Tokenizer)  # Meta's HF-repo layout
    assert isinstance(load_tokenizer(str(tmp_path / "l2")), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "l2" / "tokenizer.model", family="llama2"), SentencePieceTokenizer)


def test_path_errors(tmp_path):
    with pytest.raises(AssetError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(AssetError, match="holds none of: tokenizer.json, tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(AssetError, match=r"unknown tokenizer family 'lama3' \(did you mean 'llama3'\?\); registered: hf"):
        load_tokenizer(tmp_path, family="lama3")
    with pytest.raises(AssetError, match="tokenizer 'missing.model' is neither an existing file .* write ./missing.model"):
        load_tokenizer("missing.model")
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(b"\x00\x01binary junk")
    with pytest.raises(AssetError, match="cannot tell the format of tokenizer"):
        load_tokenizer(junk)
