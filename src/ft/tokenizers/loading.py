"""`load_tokenizer`: a card name or a path -> a `Tokenizer` of the right family.

`TOKENIZER_FAMILIES` maps each `tokenizer_family` name to its loader and the
files a tokenizer directory holds for it; `register_tokenizer_families` fills it,
one line per family. A family's module is imported only when it is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ft.assets import resolve_card_or_path
from ft.errors import AssetError, ConfigError
from ft.registry import Registry
from ft.tokenizers.base import Tokenizer


@dataclass(frozen=True)
class TokenizerFamily:
    """How to load one family: `load(file, use_eot=...)`, and the file names a
    tokenizer directory holds for it (relative to the directory, in preference order)."""

    load: Callable[..., Tokenizer]
    file_names: tuple[str, ...]


def _load_llama3(file: Path, *, use_eot: bool) -> Tokenizer:
    from ft.tokenizers.llama3 import Llama3Tokenizer

    return Llama3Tokenizer(file, use_eot=use_eot)


def _load_sentencepiece(file: Path, *, use_eot: bool) -> Tokenizer:
    from ft.tokenizers.sentencepiece import SentencePieceTokenizer

    return SentencePieceTokenizer(file, use_eot=use_eot)


def _load_hf(file: Path, *, use_eot: bool) -> Tokenizer:
    from ft.tokenizers.hf import HfTokenizer

    return HfTokenizer(file, use_eot=use_eot)


def _load_qwen(file: Path, *, use_eot: bool) -> Tokenizer:
    from ft.tokenizers.qwen import QwenTokenizer

    return QwenTokenizer(file, use_eot=use_eot)


def _load_qwen2_5(file: Path, *, use_eot: bool) -> Tokenizer:
    from ft.tokenizers.qwen import QwenTokenizer

    return QwenTokenizer(file, use_eot=use_eot, chat_format="qwen2_5")


def _load_mistral(file: Path, *, use_eot: bool) -> Tokenizer:
    from ft.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer(file, use_eot=use_eot)


_MODEL_FILES = ("tokenizer.model", "original/tokenizer.model")


def register_tokenizer_families(families: Registry[TokenizerFamily]) -> None:
    families.register("llama3", TokenizerFamily(_load_llama3, _MODEL_FILES))  # tiktoken BPE
    families.register("llama2", TokenizerFamily(_load_sentencepiece, _MODEL_FILES))  # SentencePiece
    families.register("hf", TokenizerFamily(_load_hf, ("tokenizer.json",)))
    families.register("qwen", TokenizerFamily(_load_qwen, ("tokenizer.json",)))  # byte-level BPE + ChatML
    # Qwen's, rendering Qwen2.5's template (its default system prompt when a dialog has none).
    families.register("qwen2_5", TokenizerFamily(_load_qwen2_5, ("tokenizer.json",)))
    families.register("mistral", TokenizerFamily(_load_mistral, ("tokenizer.json",)))  # [INST] control tokens


TOKENIZER_FAMILIES: Registry[TokenizerFamily] = Registry("tokenizer family")
register_tokenizer_families(TOKENIZER_FAMILIES)

# A directory of unknown family: the file names to look for, in order. tokenizer.json
# first: where both exist (HF repos), it is the one transformers reads.
_DIRECTORY_FILES = ("tokenizer.json", *_MODEL_FILES)


def tokenizer_family(name: str, *, where: str | None = None) -> TokenizerFamily:
    """The registered family `name`; an AssetError listing the families when unknown
    (`where`, e.g. "card 'x': tokenizer_family", says where the name came from)."""
    try:
        return TOKENIZER_FAMILIES.get(name)
    except ConfigError as error:
        raise AssetError(f"{where}: {error}" if where else str(error)) from None


def load_tokenizer(
    name_or_path: str | Path, *, family: str | None = None, use_eot: bool | None = None
) -> Tokenizer:
    """A tokenizer from a card name or a path (`ft.assets.resolve_card_or_path` decides which).

    A path may be a tiktoken `tokenizer.model` (Llama 3), a SentencePiece `.model`
    (Llama 2), a `tokenizer.json` (HF) or a directory holding one of them; the
    family is read from the file when `family` is not given. For a card, `family`
    and `use_eot` default to its `tokenizer_family` and `use_eot` fields.
    """
    if family is not None:
        tokenizer_family(family)
    found = resolve_card_or_path(name_or_path, what="tokenizer")
    if isinstance(found, Path):
        path = found
    else:
        card = found
        if card.get("tokenizer") is None:
            raise AssetError(
                f"card '{card.name}' has no 'tokenizer' field, so it cannot be used as a tokenizer; "
                "add 'tokenizer: path/to/tokenizer.model' to the card"
            )
        path = card.path("tokenizer")
        family = family or card.get("tokenizer_family")
        if family is not None:
            tokenizer_family(family, where=f"card '{card.name}': tokenizer_family")
        if use_eot is None:
            use_eot = bool(card.get("use_eot", False))
    file, guessed = find_tokenizer_file(path, family=family)
    family = family or guessed
    if use_eot is None:
        use_eot = _config_says_eot(file)
    return tokenizer_family(family).load(file, use_eot=use_eot)


def find_tokenizer_file(path: Path, *, family: str | None = None) -> tuple[Path, str]:
    """The tokenizer file at `path` (a file or a directory) and its guessed family."""
    if path.is_dir():
        names = list(_DIRECTORY_FILES if family is None else tokenizer_family(family).file_names)
        if family is None and not _has_tokenizers_package() and (path / "tokenizer.model").is_file():
            # tokenizer.json needs the optional `tokenizers` package; the SentencePiece or
            # tiktoken file next to it says the same with core dependencies only.
            names.remove("tokenizer.json")
        candidates = [path / name for name in names]
        for candidate in candidates:
            if candidate.is_file():
                return candidate, family or guess_family(candidate)
        listed = ", ".join(c.name for c in candidates)
        raise AssetError(f"tokenizer directory {path} holds none of: {listed}")
    return path, family or guess_family(path)


def _config_says_eot(file: Path) -> bool:
    """True when a tokenizer_config.json beside `file` (or beside its `original/` folder,
    Meta's HF layout) names <|eot_id|> as EOS: an instruct tokenizer saved by `save_hf`."""
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
    """`hf` for JSON (`qwen` when it holds ChatML's <|im_start|>, `mistral` when it holds
    [INST] and [/INST]), `llama2` for a
    SentencePiece protobuf, `llama3` for tiktoken text."""
    with open(file, "rb") as f:
        head = f.read(4096)
    if file.suffix == ".json" or head.lstrip().startswith(b"{"):
        # tokenizer.json lists its added tokens first, so the head holds them.
        if b'"<|im_start|>"' in head:
            return "qwen"
        return "mistral" if b'"[INST]"' in head and b'"[/INST]"' in head else "hf"
    first_line = head.split(b"\n", 1)[0].split()
    if len(first_line) == 2 and first_line[1].isdigit():
        return "llama3"
    # SentencePiece models are binary ModelProto messages: field 1 (pieces) first.
    if head[:1] == b"\n":
        return "llama2"
    raise AssetError(
        f"cannot tell the format of tokenizer {file}: it is neither a tiktoken BPE file "
        "('<base64 token> <rank>' per line), a SentencePiece model, nor a tokenizer.json; "
        f"give the family explicitly (tokenizer_family: {' | '.join(TOKENIZER_FAMILIES.names())})"
    )


__all__ = [
    "TOKENIZER_FAMILIES",
    "TokenizerFamily",
    "find_tokenizer_file",
    "guess_family",
    "load_tokenizer",
    "register_tokenizer_families",
    "tokenizer_family",
]
