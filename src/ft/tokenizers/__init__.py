"""Tokenizers: the `Tokenizer` base class and `load_tokenizer`.

    tok = load_tokenizer("llama3_2_1b_instruct")        # a card
    tok = load_tokenizer("/ckpt/original/tokenizer.model")  # or a path
    ids = tok.encode("hello")

Families (`tokenizer_family` in a card, or `family=`):

- `llama3`: a tiktoken BPE file (Meta's `tokenizer.model`: base64 token and rank
  per line) with the Llama 3 split pattern and 256 special tokens after the base
  vocabulary (`ft.tokenizers.llama3`).
- `llama2`: a SentencePiece model (`ft.tokenizers.sentencepiece`).
- `hf`: a Hugging Face `tokenizer.json` (`ft.tokenizers.hf`, needs `tokenizers`).

A card may set `use_eot: true` (instruct/chat models): then `encode_response`
ends a target with the end-of-turn token (`<|eot_id|>`) instead of EOS. Without a
card the switch is the `use_eot=` argument of `load_tokenizer`, else read from a
`tokenizer_config.json` beside the file (EOS `<|eot_id|>`, as `save_hf` writes it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal, Sequence

from ft.errors import AssetError

FAMILIES = ("llama3", "llama2", "hf")

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


class Tokenizer(ABC):
    """What the data pipeline, the generator and the exporters need from a tokenizer.

    Subclasses set the ids in `__init__` and implement `encode`, `decode`,
    `token_to_id`, `id_to_token` and `save_hf`.
    """

    family: str
    # Which chat template `encode_chat` renders: Meta's Llama 3 headers or Llama 2 [INST].
    chat_format: Literal["llama3", "llama2"]
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


def load_tokenizer(
    name_or_path: str | Path, *, family: str | None = None, use_eot: bool | None = None
) -> Tokenizer:
    """A tokenizer from a card name or a path.

    A path may be a tiktoken `tokenizer.model` (Llama 3), a SentencePiece `.model`
    (Llama 2), a `tokenizer.json` (HF) or a directory holding one of them; the
    family is read from the file when `family` is not given. For a card, `family`
    and `use_eot` default to its `tokenizer_family` and `use_eot` fields.
    """
    if family is not None and family not in FAMILIES:
        raise AssetError(f"unknown tokenizer family '{family}'; known: {', '.join(FAMILIES)}")
    path = Path(name_or_path).expanduser()
    looks_like_path = path.exists() or "/" in str(name_or_path) or path.suffix in (".model", ".json")
    if not looks_like_path:
        from ft.assets import load_card

        card = load_card(str(name_or_path))
        if card.get("tokenizer") is None:
            raise AssetError(
                f"card '{card.name}' has no 'tokenizer' field, so it cannot be used as a tokenizer; "
                "add 'tokenizer: path/to/tokenizer.model' to the card"
            )
        path = card.path("tokenizer")
        family = family or card.get("tokenizer_family")
        if family is not None and family not in FAMILIES:
            raise AssetError(
                f"card '{card.name}': tokenizer_family '{family}' is not one of {', '.join(FAMILIES)}"
            )
        if use_eot is None:
            use_eot = bool(card.get("use_eot", False))
    elif not path.exists():
        raise AssetError(f"tokenizer {path} does not exist")
    file, guessed = find_tokenizer_file(path, family=family)
    family = family or guessed
    if use_eot is None:
        use_eot = _config_says_eot(file)
    if family == "llama3":
        from ft.tokenizers.llama3 import Llama3Tokenizer

        return Llama3Tokenizer(file, use_eot=use_eot)
    if family == "llama2":
        from ft.tokenizers.sentencepiece import SentencePieceTokenizer

        return SentencePieceTokenizer(file, use_eot=use_eot)
    from ft.tokenizers.hf import HfTokenizer

    return HfTokenizer(file, use_eot=use_eot)


def find_tokenizer_file(path: Path, *, family: str | None = None) -> tuple[Path, str]:
    """The tokenizer file at `path` (a file or a directory) and its guessed family."""
    if path.is_dir():
        candidates = []
        if family in (None, "hf"):
            candidates.append(path / "tokenizer.json")
        if family in (None, "llama3", "llama2"):
            candidates += [path / "tokenizer.model", path / "original" / "tokenizer.model"]
        if family is None and not _has_tokenizers_package() and (path / "tokenizer.model").is_file():
            # tokenizer.json needs the optional `tokenizers` package; the SentencePiece or
            # tiktoken file next to it says the same with core dependencies only.
            candidates.remove(path / "tokenizer.json")
        for candidate in candidates:
            if candidate.is_file():
                return candidate, family or guess_family(candidate)
        names = ", ".join(c.name for c in candidates)
        raise AssetError(f"tokenizer directory {path} holds none of: {names}")
    return path, family or guess_family(path)


def _config_says_eot(file: Path) -> bool:
    """True when a tokenizer_config.json beside `file` (or beside its `original/` folder,
    Meta's HF layout) names <|eot_id|> as EOS: an instruct tokenizer saved by `save_hf`."""
    import json

    for directory in (file.parent, file.parent.parent):
        config = directory / "tokenizer_config.json"
        if config.is_file():
            try:
                eos = json.loads(config.read_text()).get("eos_token")
            except (json.JSONDecodeError, AttributeError):
                return False
            if isinstance(eos, dict):
                eos = eos.get("content")
            return eos == "<|eot_id|>"
    return False


def _has_tokenizers_package() -> bool:
    import importlib.util

    return importlib.util.find_spec("tokenizers") is not None


def guess_family(file: Path) -> str:
    """`hf` for JSON, `llama2` for a SentencePiece protobuf, `llama3` for tiktoken text."""
    with open(file, "rb") as f:
        head = f.read(4096)
    if file.suffix == ".json" or head.lstrip().startswith(b"{"):
        return "hf"
    first_line = head.split(b"\n", 1)[0].split()
    if len(first_line) == 2 and first_line[1].isdigit():
        return "llama3"
    # SentencePiece models are binary ModelProto messages: field 1 (pieces) first.
    if head[:1] == b"\n":
        return "llama2"
    raise AssetError(
        f"cannot tell the format of tokenizer {file}: it is neither a tiktoken BPE file "
        "('<base64 token> <rank>' per line), a SentencePiece model, nor a tokenizer.json; "
        "give the family explicitly (tokenizer_family: llama3 | llama2 | hf)"
    )


__all__ = ["FAMILIES", "Tokenizer", "find_tokenizer_file", "guess_family", "load_tokenizer"]
