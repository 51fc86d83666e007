"""What the chat formats (`chat`, `qwen_chat`, `mistral_chat`) share: the message type,
the part of a tokenizer they use, and the prefix rule that splits prompt from target.

`ChatTokenizer` is a Protocol rather than `ft.tokenizers.base.Tokenizer`, whose chat
methods import the chat formats: annotating with it would make the modules import
each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


class ChatTokenizer(Protocol):
    """The attributes and methods of a `Tokenizer` that rendering a chat reads."""

    chat_format: str
    bos_id: int | None
    eos_id: int
    path: Path

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False, *,
               allow_special: bool = False) -> list[int]: ...

    def token_to_id(self, token: str) -> int | None: ...

    def id_to_token(self, token_id: int) -> str: ...


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading ids `a` and `b` share: the prompt's part of a turn encoded whole."""
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length
