"""Llama 2 (SentencePiece) tokenizer: parity with sentencepiece, special tokens, SFT encodings, chat."""

from __future__ import annotations

import pytest
import sentencepiece as spm
from tokenizer_helpers import VARIED_TEXTS

from ft.errors import AssetError, DataError
from ft.tokenizers import load_tokenizer
from ft.tokenizers.sentencepiece import SentencePieceTokenizer


@pytest.fixture(scope="module")
def reference(sentencepiece_file):
    return spm.SentencePieceProcessor(model_file=str(sentencepiece_file))


@pytest.fixture(scope="module")
def tok(sentencepiece_file):
    return load_tokenizer(sentencepiece_file)


def test_family_and_ids_come_from_the_model(tok, reference):
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.family == "llama2" and tok.chat_format == "llama2"
    assert tok.vocab_size == reference.get_piece_size()
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id) == (1, 2, None, None)
    assert tok.stop_ids == [2]


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_same_ids_as_sentencepiece(tok, reference, text):
    assert tok.encode(text) == reference.encode(text)
    assert tok.decode(tok.encode(text)) == reference.decode(reference.encode(text))


def test_byte_fallback_round_trips_unseen_characters(tok):
    text = "ǅ ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦙"
    ids = tok.encode(text)
    assert tok.token_to_id("<unk>") not in ids
    assert tok.decode(ids) == text


def test_special_tokens_encode_only_when_allowed_and_decode(tok):
    text = "<s>hello</s>"
    plain = tok.encode(text)
    assert 1 not in plain and 2 not in plain
    assert tok.decode(plain) == text

    special = tok.encode(text, allow_special=True)
    assert special == [1, *tok.encode("hello"), 2]
    assert tok.decode(special, skip_special_tokens=False) == text
    assert tok.decode(special) == "hello"
    assert tok.token_to_id("<s>") == 1 and tok.id_to_token(2) == "</s>"
    assert tok.token_to_id("no-such-piece") is None


def test_sft_encodings(tok):
    assert tok.encode("hi", add_bos=True, add_eos=True) == [1, *tok.encode("hi"), 2]
    assert tok.encode_prompt("What is 1 + 1?\n") == [1, *tok.encode("What is 1 + 1?\n")]
    # Llama 2 has no end-of-turn token: use_eot falls back to EOS.
    assert tok.encode_response("2") == [*tok.encode("2"), 2]


DIALOG = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2? "},
    {"role": "assistant", "content": " 4"},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6 it is"},
]


def test_chat_matches_meta_chat_completion(tok, reference):
    ids, mask = tok.encode_chat(DIALOG)
    # Meta's llama/generation.py: system folded into the first user turn, one
    # `[INST] u [/INST] a ` string per turn between BOS and EOS.
    first = "[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nWhat is 2 + 2? [/INST] 4 "
    second = "[INST] And 3 + 3? [/INST] 6 it is "
    expected = [1, *reference.encode(first), 2, 1, *reference.encode(second), 2]
    assert ids == expected
    assert len(mask) == len(ids)

    # Target: from the space before each answer through its EOS.
    expected_mask = []
    for full in (first, second):
        prompt = full[: full.index("[/INST]") + len("[/INST]")]
        prompt_ids, full_ids = reference.encode(prompt), reference.encode(full)
        assert full_ids[: len(prompt_ids)] == prompt_ids
        expected_mask += [False] * (1 + len(prompt_ids)) + [True] * (len(full_ids) - len(prompt_ids) + 1)
    assert mask == expected_mask
    targets = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(targets) == "4  6 it is "  # EOS dropped; each answer keeps its spaces


def test_chat_generation_prompt_ends_with_inst(tok, reference):
    ids, mask = tok.encode_chat(DIALOG[:4], add_generation_prompt=True)
    assert ids[-len(reference.encode("[INST] And 3 + 3? [/INST]")) - 1 :] == [
        1,
        *reference.encode("[INST] And 3 + 3? [/INST]"),
    ]
    assert not any(mask[-5:])


def test_chat_rejects_roles_out_of_order(tok):
    with pytest.raises(DataError, match="alternate user/assistant"):
        tok.encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(DataError, match="ends with a user message"):
        tok.encode_chat(DIALOG[:3], add_generation_prompt=True)


def test_not_a_sentencepiece_model(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\n\x00garbage")
    with pytest.raises(AssetError, match="not a SentencePiece model"):
        load_tokenizer(path, family="llama2")
