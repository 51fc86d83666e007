"""Hugging Face interop: `save_hf` output read by transformers, and `tokenizer.json` read by ft."""

from __future__ import annotations

import json

import pytest
from tokenizer_helpers import VARIED_TEXTS

from ft.errors import AssetError
from ft.tokenizers import load_tokenizer
from ft.tokenizers.hf import HfTokenizer

# Texts without special-token spellings: transformers reads "<s>" in text as the
# special token, ft only with allow_special (checked separately below).
PLAIN_TEXTS = [t for t in VARIED_TEXTS if "<" not in t]

DIALOG = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6"},
]


@pytest.fixture(scope="module", params=["llama3", "llama2"])
def saved(request, tiktoken_file, sentencepiece_file, tmp_path_factory):
    """(ft tokenizer, directory written by its save_hf)."""
    pytest.importorskip("tokenizers")
    path = tiktoken_file if request.param == "llama3" else sentencepiece_file
    tok = load_tokenizer(path, use_eot=request.param == "llama3")
    out = tmp_path_factory.mktemp(f"hf_{request.param}")
    tok.save_hf(out)
    return tok, out


def test_save_hf_writes_the_files_transformers_reads(saved):
    tok, out = saved
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (out / "tokenizer.json").is_file()
    assert config["chat_template"]
    assert config["eos_token"] == tok.id_to_token(tok.end_of_response_id)
    if tok.family == "llama2":
        assert (out / "tokenizer.model").read_bytes() == tok.path.read_bytes()
        assert json.loads((out / "special_tokens_map.json").read_text())["bos_token"] == "<s>"
    else:
        # Meta's HF layout keeps the tiktoken file in original/.
        assert (out / "original" / "tokenizer.model").read_bytes() == tok.path.read_bytes()


def test_saved_directory_loads_back_with_its_family(saved):
    tok, out = saved
    again = load_tokenizer(out, family=tok.family)  # the SentencePiece / tiktoken file, not tokenizer.json
    assert type(again) is type(tok)
    assert again.use_eot == tok.use_eot  # read from tokenizer_config.json's eos_token
    assert again.encode_response("ok") == tok.encode_response("ok")


def test_transformers_gives_the_same_ids(saved):
    transformers = pytest.importorskip("transformers")
    tok, out = saved
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert len(hf) == tok.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.end_of_response_id)
    for text in PLAIN_TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text
        assert hf.encode(text) == tok.encode(text, add_bos=True), text
        assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text)), text
    special = tok.id_to_token(tok.bos_id) + "hi" + tok.id_to_token(tok.eos_id)
    assert hf.encode(special, add_special_tokens=False) == tok.encode(special, allow_special=True)


def test_transformers_chat_template_renders_encode_chat(saved):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("jinja2")
    tok, out = saved
    hf = transformers.AutoTokenizer.from_pretrained(out)
    for dialog, generation in ((DIALOG, False), (DIALOG[:4], True)):
        ids, _ = tok.encode_chat(dialog, add_generation_prompt=generation)
        rendered = hf.apply_chat_template(dialog, tokenize=False, add_generation_prompt=generation)
        assert hf.encode(rendered, add_special_tokens=False) == ids


def test_tokenizer_json_read_by_ft_matches_the_original(saved):
    tok, out = saved
    hf_tok = load_tokenizer(out)  # a directory with tokenizer.json: the hf family
    assert isinstance(hf_tok, HfTokenizer)
    assert (hf_tok.vocab_size, hf_tok.bos_id, hf_tok.eos_id, hf_tok.eot_id) == (
        tok.vocab_size,
        tok.bos_id,
        tok.eos_id,
        tok.eot_id,
    )
    assert hf_tok.use_eot == tok.use_eot
    assert hf_tok.chat_format == tok.chat_format
    for text in VARIED_TEXTS:
        assert hf_tok.encode(text) == tok.encode(text), text
        assert hf_tok.encode(text, allow_special=True) == tok.encode(text, allow_special=True), text
        assert hf_tok.decode(tok.encode(text)) == tok.decode(tok.encode(text)), text
    assert hf_tok.encode_response("ok") == tok.encode_response("ok")
    assert hf_tok.encode_chat(DIALOG) == tok.encode_chat(DIALOG)
    assert hf_tok.encode_chat(DIALOG[:4], add_generation_prompt=True) == tok.encode_chat(
        DIALOG[:4], add_generation_prompt=True
    )

    resaved = out.parent / (out.name + "_resaved")
    hf_tok.save_hf(resaved)
    assert load_tokenizer(resaved).encode("Hello world") == tok.encode("Hello world")


def test_broken_tokenizer_json(tmp_path):
    pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    path.write_text('{"not": "a tokenizer"}')
    with pytest.raises(AssetError, match="not a valid tokenizer.json"):
        load_tokenizer(path)


def test_config_naming_a_missing_token(saved, tmp_path):
    tok, out = saved
    (tmp_path / "tokenizer.json").write_bytes((out / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(AssetError, match=r"eos_token '<\|nope\|>' is not in the vocabulary"):
        load_tokenizer(tmp_path)
