"""`Tokenizer`: what the data pipeline, the generator and the exporters need from a tokenizer.

Each family's module (`llama3`, `sentencepiece`, `hf`) subclasses it; they import
it from here, not from the package, whose `__init__` imports the loader.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal, Sequence

from ft.tokenizers.chat_common import Message


class Tokenizer(ABC):
    """What the data pipeline, the generator and the exporters need from a tokenizer.

    Subclasses set the ids in `__init__` and implement `encode`, `decode`,
    `token_to_id`, `id_to_token` and `save_hf`.
    """

    family: str
    # Which chat template `encode_chat` renders: Meta's Llama 3 headers or Llama 2 [INST].
    chat_format: Literal["llama3", "llama2", "chatml", "qwen3", "qwen2_5", "mistral"]
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int | None
    eot_id: int | None
    use_eot: bool
    path: Path

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end generation: EOS and, where the vocabulary has one, EOT."""
        ids = [self.eos_id]
        if self.eot_id is not None and self.eot_id != self.eos_id:
            ids.append(self.eot_id)
        return ids

    @property
    def end_of_response_id(self) -> int:
        """The id that closes an SFT target: EOT for instruct tokenizers, else EOS."""
        if self.use_eot and self.eot_id is not None:
            return self.eot_id
        return self.eos_id

    @abstractmethod
    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False, *, allow_special: bool = False
    ) -> list[int]:
        """Token ids of `text`. Special-token text (`<|eot_id|>`, `<s>`) in `text` is
        plain text unless `allow_special`, so user data can never inject control tokens."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are dropped unless `skip_special_tokens=False`."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry (piece or special token), None if absent."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of an id, as the underlying library spells it."""

    @abstractmethod
    def save_hf(self, out_dir: str | Path) -> None:
        """Write the files transformers' `AutoTokenizer` and vLLM read into `out_dir`."""

    def encode_prompt(self, source: str) -> list[int]:
        """SFT prompt: BOS + source (no loss on these tokens)."""
        return self.encode(source, add_bos=True)

    def encode_response(self, target: str) -> list[int]:
        """SFT target: target + EOS, or + EOT for instruct tokenizers (`use_eot`)."""
        return self.encode(target) + [self.end_of_response_id]

    def encode_chat(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """A dialog rendered with this tokenizer's chat template.

        Returns the ids and a target mask that is True on assistant tokens (the
        content and the token that ends the turn) and False everywhere else.
        """
        from ft.tokenizers.chat import encode_chat

        return encode_chat(self, messages, add_generation_prompt=add_generation_prompt)

    def chat_template(self) -> str:
        """The Jinja chat template transformers uses for this tokenizer's chat format."""
        from ft.tokenizers.chat import jinja_chat_template

        return jinja_chat_template(self.chat_format)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={str(self.path)!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id}, eot_id={self.eot_id}, "
            f"use_eot={self.use_eot})"
        )


__all__ = ["Message", "Tokenizer"]
