"""Mistral's `[INST]` chat format (Mistral 7B Instruct v0.3, SentencePiece vocabulary
with `[INST]` / `[/INST]` as control tokens), as its Hugging Face template renders it:

    <s>[INST] {user}[/INST] {assistant}</s>[INST] {user}[/INST]

Messages alternate user/assistant after an optional system message; the system
message is put before the content of the last user turn (`{system}\\n\\n{user}`), as
Mistral's own tokenizer library does. Mistral's HF template puts it there only when
that user turn is the dialog's last message, so on a training dialog that ends with
the assistant it drops the system message; ft keeps it, and so does the template ft
writes for a tokenizer that has none (`MISTRAL_JINJA`). Dialogs that end with a user
turn (every generation prompt) render the same under both. Assistant
contents are stripped; the mask is True on ` {assistant}</s>`.

The ids are those of the whole rendered string (as `apply_chat_template` followed by
tokenization gives them); a message whose text holds a control token's spelling
(`[INST]`, `</s>`) is refused, so data never injects control tokens.
"""

from __future__ import annotations

from pathlib import Path

from ft.errors import AssetError
from ft.tokenizers.hf import HfTokenizer
from ft.tokenizers.mistral_chat import B_INST, E_INST, MISTRAL_JINJA, encode_mistral  # noqa: F401  (re-exported)


class MistralTokenizer(HfTokenizer):
    """A Mistral `tokenizer.json` (SentencePiece-style BPE with `[INST]` control tokens)."""

    family = "mistral"

    def __init__(self, path: str | Path, *, use_eot: bool = False) -> None:
        super().__init__(path, use_eot=use_eot)
        for token in (B_INST, E_INST):
            if self.token_to_id(token) is None:
                raise AssetError(f"{self.path} has no {token} token: it is not a Mistral v0.3 tokenizer "
                                 "(tokenizer_family: mistral)")
        self.chat_format = "mistral"  # type: ignore[assignment]


__all__ = ["MISTRAL_JINJA", "MistralTokenizer", "encode_mistral"]
