"""Mistral v0.3's chat format (`mistral`), apart from its tokenizer so that
`ft.tokenizers.chat` reads it without importing a tokenizer class; see
`ft.tokenizers.mistral`.
"""

from __future__ import annotations

from typing import Sequence

from ft.errors import AssetError, DataError
from ft.tokenizers.chat_common import ChatTokenizer, Message


B_INST, E_INST = "[INST]", "[/INST]"

MISTRAL_JINJA = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.index0 == ns.last_user and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] | trim + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def encode_mistral(
    tokenizer: ChatTokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """A dialog in Mistral's [INST] format: (ids, mask True on each assistant answer and its </s>).
    The rendering always ends a user turn with `[/INST]`, the generation prompt itself."""
    for token in (B_INST, E_INST):
        if tokenizer.token_to_id(token) is None:
            raise AssetError(f"the tokenizer at {tokenizer.path} has no {token} token, so it cannot render a "
                             "Mistral [INST] chat")
    dialog = list(messages)
    system = dialog.pop(0)["content"] if dialog[0]["role"] == "system" else None
    for index, message in enumerate(dialog):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise DataError("a Mistral chat must alternate user/assistant after an optional system message; "
                            f"turn {index} is {message['role']!r}, expected {expected!r}")
        _check_no_control_text(tokenizer, message["content"], index)
    if system is not None:
        _check_no_control_text(tokenizer, system, "system")
    if add_generation_prompt and (not dialog or dialog[-1]["role"] != "user"):
        raise DataError("add_generation_prompt needs a Mistral chat that ends with a user message")
    last_user = max((i for i, m in enumerate(dialog) if m["role"] == "user"), default=-1)

    bos = tokenizer.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    eos = tokenizer.id_to_token(tokenizer.eos_id)
    text = bos
    answers: list[tuple[int, int]] = []  # character spans of ' {answer}</s>'
    for index, message in enumerate(dialog):
        if message["role"] == "user":
            content = message["content"]
            if index == last_user and system is not None:
                content = f"{system}\n\n{content}"
            text += f"{B_INST} {content}{E_INST}"
        else:
            start = len(text)
            text += f" {message['content'].strip()}{eos}"
            answers.append((start, len(text)))
    ids = tokenizer.encode(text, allow_special=True)
    mask = [False] * len(ids)
    # Every span starts after a control token and ends with one, where the tokenization
    # of the whole string splits, so a prefix's ids are a prefix of `ids`.
    for start, end in answers:
        first = len(tokenizer.encode(text[:start], allow_special=True))
        last = len(tokenizer.encode(text[:end], allow_special=True))
        mask[first:last] = [True] * (last - first)
    return ids, mask


def _check_no_control_text(tokenizer: ChatTokenizer, text: str, where: int | str) -> None:
    if tokenizer.encode(text, allow_special=True) != tokenizer.encode(text):
        raise DataError(f"chat message {where} holds the text of a control token (such as {B_INST} or "
                        f"{tokenizer.id_to_token(tokenizer.eos_id)}); Mistral's chat format cannot carry it as text")


__all__ = ["B_INST", "E_INST", "MISTRAL_JINJA", "encode_mistral"]
