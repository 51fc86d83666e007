"""Qwen tokenizer: a byte-level BPE tokenizer.json trained here with Qwen's control
tokens gives AutoTokenizer's ids; ChatML and Qwen3 renderings equal
apply_chat_template; the assistant mask covers exactly the assistant turns; Qwen3's
empty thinking block is not trained on unless asked; the export reloads."""

from __future__ import annotations

import pytest
from tokenizer_helpers import VARIED_TEXTS

from ft.tokenizers import load_tokenizer
from ft.tokenizers.chat import CHATML_JINJA
from ft.tokenizers.qwen import QWEN3_JINJA, QwenTokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from qwen_tokenizer_helpers import train_qwen_tokenizer  # noqa: E402  (needs tokenizers)


@pytest.fixture(scope="module")
def qwen25_dir(tmp_path_factory):
    return train_qwen_tokenizer(tmp_path_factory.mktemp("qwen25"))


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return train_qwen_tokenizer(tmp_path_factory.mktemp("qwen3"), qwen3=True)


DIALOGS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "The answer is 4."}],
    [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hello world!"},
        {"role": "assistant", "content": "\nHow are you today?"},  # content that opens with a newline
        {"role": "user", "content": " café 東京 "},
        {"role": "assistant", "content": "  fine, thanks.\n\n"},
    ],
]


def hf_ids(hf, dialog, template, **kwargs):
    out = hf.apply_chat_template(dialog, chat_template=template, tokenize=True, **kwargs)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def test_family_ids_and_special_tokens(qwen25_dir):
    tok = load_tokenizer(str(qwen25_dir))  # the family is read from the file
    assert isinstance(tok, QwenTokenizer) and tok.chat_format == "chatml"
    hf = transformers.AutoTokenizer.from_pretrained(qwen25_dir)
    for text in VARIED_TEXTS + ["Hi<|im_end|>there", "a\n\n\nb  c"]:
        assert tok.encode(text, allow_special=True) == hf.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text)) == text
    # Control-token text in data stays text unless allowed.
    assert tok.token_to_id("<|im_end|>") not in tok.encode("<|im_end|>")
    assert tok.bos_id is None and tok.encode_prompt("hi") == tok.encode("hi")
    im_end, endoftext = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    assert (tok.eos_id, tok.eot_id, tok.pad_id) == (endoftext, im_end, endoftext)
    assert im_end in tok.stop_ids and tok.end_of_response_id == im_end  # the config's eos is <|im_end|>


@pytest.mark.parametrize("dialog", DIALOGS)
def test_chatml_equals_apply_chat_template_and_masks_assistant_turns(qwen25_dir, dialog):
    tok = load_tokenizer(str(qwen25_dir))
    hf = transformers.AutoTokenizer.from_pretrained(qwen25_dir)
    ids, mask = tok.encode_chat(dialog)
    assert ids == hf_ids(hf, dialog, CHATML_JINJA)
    prompt_ids, prompt_mask = tok.encode_chat(dialog[:-1], add_generation_prompt=True)
    assert prompt_ids == hf_ids(hf, dialog[:-1], CHATML_JINJA, add_generation_prompt=True)
    assert not any(prompt_mask[len(tok.encode_chat(dialog[:-1])[0]):])  # the generation prompt is no target
    # The masked tokens are the assistant contents, each followed by <|im_end|>.
    im_end = tok.token_to_id("<|im_end|>")
    targets = [tok.decode([i], skip_special_tokens=False) for i, m in zip(ids, mask) if m]
    expected = "".join(m["content"] + "<|im_end|>" for m in dialog if m["role"] == "assistant")
    assert "".join(targets) == expected
    assert [i for i, m in zip(ids, mask) if m].count(im_end) == sum(m["role"] == "assistant" for m in dialog)


THINK_DIALOGS = [
    # no reasoning: the final turn gets an empty thinking block
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "The answer is 4."}],
    # reasoning inline, and an earlier turn whose reasoning the template drops
    [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "<think>\nold thought\n</think>\n\nHi!"},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nThe answer is 4."},
    ],
    # reasoning as a field
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Numbers?"},
        {"role": "assistant", "content": "12345", "reasoning_content": "count up"},
    ],
]


@pytest.mark.parametrize("dialog", THINK_DIALOGS)
def test_qwen3_equals_its_template_and_trains_only_real_reasoning(qwen3_dir, dialog):
    tok = load_tokenizer(str(qwen3_dir))
    assert tok.chat_format == "qwen3"
    hf = transformers.AutoTokenizer.from_pretrained(qwen3_dir)
    ids, mask = tok.encode_chat(dialog)
    assert ids == hf_ids(hf, dialog, QWEN3_JINJA)
    target = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    final = dialog[-1]
    reasoning = final.get("reasoning_content") or ("add them" if "<think>" in final["content"] else "")
    if reasoning:
        assert target.endswith(f"<think>\n{reasoning}\n</think>\n\n" + final["content"].split("</think>\n\n")[-1] + "<|im_end|>")
    else:
        assert "<think>" not in target and target == final["content"] + "<|im_end|>"
        tok.train_empty_think = True
        ids2, mask2 = tok.encode_chat(dialog)
        assert ids2 == ids
        assert tok.decode([i for i, m in zip(ids2, mask2) if m], skip_special_tokens=False) == (
            "<think>\n\n</think>\n\n" + final["content"] + "<|im_end|>"
        )
    assert "old thought" not in tok.decode(ids)  # reasoning before the last user turn is dropped
    prompt = tok.encode_chat(dialog[:-1], add_generation_prompt=True)[0]
    assert prompt == hf_ids(hf, dialog[:-1], QWEN3_JINJA, add_generation_prompt=True)


def test_save_hf_reloads_with_the_same_chat_ids(qwen3_dir, tmp_path):
    tok = load_tokenizer(str(qwen3_dir))
    tok.config.pop("chat_template", None)
    tok.save_hf(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    dialog = THINK_DIALOGS[1]
    assert hf_ids(hf, dialog, None) == tok.encode_chat(dialog)[0]
    reloaded = load_tokenizer(str(tmp_path))
    assert isinstance(reloaded, QwenTokenizer) and reloaded.stop_ids == tok.stop_ids
