"""Qwen2.5's chat format (`qwen2_5`): ChatML led by Qwen2.5's default system prompt
when a dialog has none. ft's ids equal `apply_chat_template` with Qwen2.5-Instruct's
own template (its non-tool part, as published), the default system prompt is no
target, the Qwen2.5 cards use it, and a tokenizer whose `tokenizer_config.json`
carries that template (a Qwen2.5 repository, an ft export) is recognised."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ft.assets import load_card
from ft.tokenizers import load_tokenizer
from ft.tokenizers.qwen import QWEN2_5_DEFAULT_SYSTEM

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen_tokenizer_helpers import train_qwen_tokenizer  # noqa: E402

# Qwen2.5-Instruct's tokenizer_config.json chat_template with the `tools` branches left out.
QWEN2_5_INSTRUCT_TEMPLATE = """\
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

DIALOGS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "The answer is 4."}],
    [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hello world!"},
        {"role": "assistant", "content": "\nHow are you today?"},
        {"role": "user", "content": " café 東京 "},
        {"role": "assistant", "content": "  fine, thanks.\n\n"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Numbers: 12345"},
        {"role": "assistant", "content": "3.14159"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_qwen_tokenizer(tmp_path_factory.mktemp("qwen2_5"))


def hf_ids(hf, dialog, template, **kwargs):
    out = hf.apply_chat_template(dialog, chat_template=template, tokenize=True, **kwargs)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


@pytest.mark.parametrize("dialog", DIALOGS)
def test_qwen2_5_equals_the_instruct_template(tokenizer_dir, dialog):
    tok = load_tokenizer(str(tokenizer_dir), family="qwen2_5")
    assert tok.chat_format == "qwen2_5"
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ids, mask = tok.encode_chat(dialog)
    assert ids == hf_ids(hf, dialog, QWEN2_5_INSTRUCT_TEMPLATE)
    assert ids == hf_ids(hf, dialog, tok.chat_template())  # the template ft exports
    prompt_ids, _ = tok.encode_chat(dialog[:-1], add_generation_prompt=True)
    assert prompt_ids == hf_ids(hf, dialog[:-1], QWEN2_5_INSTRUCT_TEMPLATE, add_generation_prompt=True)
    assert (QWEN2_5_DEFAULT_SYSTEM in tok.decode(ids)) == (dialog[0]["role"] != "system")
    # Only the assistant turns are targets, never the default system prompt.
    target = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert target == "".join(m["content"] + "<|im_end|>" for m in dialog if m["role"] == "assistant")


def test_plain_chatml_has_no_default_system(tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    assert tok.chat_format == "chatml"
    assert QWEN2_5_DEFAULT_SYSTEM not in tok.decode(tok.encode_chat(DIALOGS[0])[0])


def test_config_with_the_qwen2_5_template_is_recognised(tmp_path):
    directory = train_qwen_tokenizer(tmp_path / "tok")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN2_5_INSTRUCT_TEMPLATE}))
    assert load_tokenizer(str(directory)).chat_format == "qwen2_5"


@pytest.mark.parametrize("name", ["qwen2_5_0_5b_instruct", "qwen2_5_7b", "qwen2_5_72b_instruct"])
def test_qwen2_5_cards_use_the_qwen2_5_format(name):
    assert load_card(name).get("tokenizer_family") == "qwen2_5"
    assert load_card("qwen3_8b").get("tokenizer_family") == "qwen"
