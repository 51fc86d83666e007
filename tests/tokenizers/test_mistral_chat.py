"""Mistral's [INST] chat format on a tiny SentencePiece-style tokenizer: ft's ids equal
transformers' `apply_chat_template` with Mistral 7B Instruct v0.3's template, the mask
covers exactly each ` {answer}</s>`, the system message goes to the last user turn, and
control-token text in a message is refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ft.errors import DataError
from ft.tokenizers import load_tokenizer
from ft.tokenizers.mistral import MISTRAL_JINJA

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mistral_tokenizer_helpers import train_mistral_tokenizer  # noqa: E402

USER, ANSWER = {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": " The answer is 5. "}
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
DIALOGS = [
    [USER],
    [USER, ANSWER],
    [USER, ANSWER, {"role": "user", "content": "Name three colours."}],
    [USER, ANSWER, {"role": "user", "content": "Name three colours."}, {"role": "assistant", "content": "red"}],
    [SYSTEM, USER],
    [SYSTEM, USER, ANSWER, {"role": "user", "content": "Hello world!"}],
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    directory = train_mistral_tokenizer(tmp_path_factory.mktemp("mistral_tokenizer"))
    return load_tokenizer(str(directory / "tokenizer.json")), transformers.AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("dialog", DIALOGS, ids=range(len(DIALOGS)))
def test_ids_equal_apply_chat_template_and_mask_covers_the_answers(tokenizers, dialog):
    ours, hf = tokenizers
    assert ours.family == "mistral" and ours.chat_format == "mistral"
    ids, mask = ours.encode_chat(dialog)
    assert ids == hf.apply_chat_template(dialog, tokenize=True, return_dict=False)
    answers = [m["content"].strip() for m in dialog if m["role"] == "assistant"]
    runs, run = [], None  # the masked stretches of ids, as (start, end)
    for index, target in enumerate([*mask, False]):
        if target and run is None:
            run = index
        elif not target and run is not None:
            runs.append((run, index))
            run = None
    assert [ours.decode(ids[a:b], skip_special_tokens=False).strip() for a, b in runs] == [f"{a}</s>" for a in answers]
    inst_end = ours.token_to_id("[/INST]")
    assert all(ids[a - 1] == inst_end and ids[b - 1] == ours.eos_id for a, b in runs)


def test_the_system_message_goes_to_the_last_user_turn(tokenizers):
    ours, hf = tokenizers
    dialog = [SYSTEM, USER, ANSWER]
    rendered = ours.decode(ours.encode_chat(dialog)[0], skip_special_tokens=False)
    assert "[INST] You are a helpful assistant.\n\nWhat is 2 + 3?[/INST]" in rendered
    # Mistral's HF template drops it when the dialog ends with the answer; ft's exported template keeps it.
    assert "helpful" not in hf.apply_chat_template(dialog, tokenize=False)
    assert hf.apply_chat_template(dialog, tokenize=False, chat_template=MISTRAL_JINJA) == \
        ours.decode(ours.encode_chat(dialog)[0], skip_special_tokens=False)


def test_control_token_text_and_bad_turn_order_are_refused(tokenizers):
    ours, _ = tokenizers
    with pytest.raises(DataError, match="control token"):
        ours.encode_chat([{"role": "user", "content": "say [INST] twice"}, ANSWER])
    with pytest.raises(DataError, match="alternate"):
        ours.encode_chat([ANSWER, USER])
