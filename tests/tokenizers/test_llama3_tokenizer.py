"""Llama 3 tokenizer: parity with tiktoken, special tokens, SFT encodings, chat template."""

from __future__ import annotations

import base64

import pytest
import tiktoken

from tokenizer_helpers import VARIED_TEXTS
from ft.errors import AssetError
from ft.tokenizers import load_tokenizer
from ft.tokenizers.llama3 import PATTERN, Llama3Tokenizer, read_tiktoken_ranks


@pytest.fixture(scope="module")
def reference(tiktoken_file):
    """tiktoken used directly, as Meta's reference tokenizer does."""
    ranks = read_tiktoken_ranks(tiktoken_file)
    return tiktoken.Encoding("reference", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})


@pytest.fixture(scope="module")
def tok(tiktoken_file):
    return load_tokenizer(tiktoken_file)


def test_family_is_guessed_from_the_file(tok):
    assert isinstance(tok, Llama3Tokenizer)
    assert tok.family == "llama3" and tok.chat_format == "llama3"


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_same_ids_as_tiktoken(tok, reference, text):
    assert tok.encode(text) == reference.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_long_whitespace_runs_match_tiktoken(tok, reference):
    # Meta cuts runs longer than 25k characters before tiktoken; below that nothing changes.
    text = "a" + " " * 20_000 + "b\n" * 1000 + "word " * 3000
    assert tok.encode(text) == reference.encode(text)
    long_run = "x" * 30_000
    assert tok.decode(tok.encode(long_run)) == long_run


def test_special_tokens_follow_the_base_vocabulary(tok, tiktoken_file):
    base = len(read_tiktoken_ranks(tiktoken_file))
    assert tok.vocab_size == base + 256
    assert tok.bos_id == base + 0
    assert tok.eos_id == base + 1
    assert tok.pad_id == base + 4  # <|finetune_right_pad_id|>
    assert tok.token_to_id("<|start_header_id|>") == base + 6
    assert tok.token_to_id("<|end_header_id|>") == base + 7
    assert tok.token_to_id("<|eom_id|>") == base + 8
    assert tok.eot_id == tok.token_to_id("<|eot_id|>") == base + 9
    assert tok.token_to_id("<|python_tag|>") == base + 10
    assert tok.id_to_token(base + 255) == "<|reserved_special_token_246|>"
    assert tok.stop_ids == [base + 1, base + 9, base + 8]


def test_special_tokens_encode_only_when_allowed_and_decode(tok):
    text = "<|begin_of_text|>hi<|eot_id|>"
    plain = tok.encode(text)
    assert tok.bos_id not in plain and tok.eot_id not in plain
    assert tok.decode(plain) == text

    special = tok.encode(text, allow_special=True)
    assert special[0] == tok.bos_id and special[-1] == tok.eot_id
    assert special[1:-1] == tok.encode("hi")
    assert tok.decode(special, skip_special_tokens=False) == text
    assert tok.decode(special) == "hi"


def test_bos_eos_and_sft_encodings(tiktoken_file, tok):
    assert tok.encode("hi", add_bos=True, add_eos=True) == [tok.bos_id, *tok.encode("hi"), tok.eos_id]
    assert tok.encode_prompt("Question?") == [tok.bos_id, *tok.encode("Question?")]
    assert tok.encode_response("Answer.") == [*tok.encode("Answer."), tok.eos_id]

    instruct = load_tokenizer(tiktoken_file, use_eot=True)
    assert instruct.encode_response("Answer.") == [*instruct.encode("Answer."), instruct.eot_id]


DIALOG = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": " What is 2 + 2? "},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6\n"},
]


def test_chat_rendering_matches_meta_format(tok):
    ids, mask = tok.encode_chat(DIALOG)
    expected = (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 3 + 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n6<|eot_id|>"
    )
    assert tok.decode(ids, skip_special_tokens=False) == expected
    assert len(mask) == len(ids)

    # Target tokens are exactly the assistant contents, each with its <|eot_id|>.
    targets = [i for i, m in zip(ids, mask) if m]
    assert targets == [*tok.encode("4"), tok.eot_id, *tok.encode("6"), tok.eot_id]
    # The header right before each answer is not a target.
    header_end = [k for k, i in enumerate(ids) if i == tok.token_to_id("<|end_header_id|>")]
    assert not any(mask[: header_end[2] + 2])


def test_chat_generation_prompt(tok):
    ids, mask = tok.encode_chat(DIALOG[:2], add_generation_prompt=True)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.endswith("What is 2 + 2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert not any(mask)


def test_chat_rejects_bad_messages(tok):
    from ft.errors import DataError

    with pytest.raises(DataError, match="role 'bot'"):
        tok.encode_chat([{"role": "bot", "content": "x"}])
    with pytest.raises(DataError, match="'role' and 'content'"):
        tok.encode_chat([{"content": "x"}])
    with pytest.raises(DataError, match="no messages"):
        tok.encode_chat([])


def test_malformed_file_names_the_line(tmp_path):
    good = base64.b64encode(b"a").decode()
    path = tmp_path / "tokenizer.model"
    path.write_text(f"{good} 0\nnot-a-valid-line\n")
    with pytest.raises(AssetError, match=r"tokenizer.model:2: expected '<base64 token> <rank>'"):
        load_tokenizer(path, family="llama3")

    path.write_text(f"{good} 0\n{base64.b64encode(b'b').decode()} 5\n")
    with pytest.raises(AssetError, match="ranks must be 0..1"):
        load_tokenizer(path, family="llama3")


def test_save_hf_without_tokenizers_package_still_saves_what_it_can(tok, tmp_path, monkeypatch, caplog):
    import importlib.util
    import sys

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == "tokenizers" else real_find_spec(name, *a, **k)
    )
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now fails
    tok.save_hf(tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
    assert "needs the `tokenizers` package" in caplog.text
    # The directory still loads in ft, through Meta's file.
    again = load_tokenizer(tmp_path)
    assert isinstance(again, Llama3Tokenizer) and again.encode("Hello world") == tok.encode("Hello world")
    # A tokenizer.json cannot be read at all without the package: a clear error.
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(AssetError, match="needs the `tokenizers` package"):
        load_tokenizer(tmp_path / "tokenizer.json")
