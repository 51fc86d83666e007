"""The Llama 3 tokenizer: Meta's tiktoken BPE file, split pattern and special tokens.

`tokenizer.model` holds one `<base64 token> <rank>` line per base token. The 256
special tokens follow the base vocabulary (ids 128000-128255 for Meta's 128000
ranks), in the order of Meta's `llama-models` tokenizer, so the ids that matter
(`<|begin_of_text|>` +0, `<|end_of_text|>` +1, `<|finetune_right_pad_id|>` +4,
`<|start_header_id|>` +6, `<|end_header_id|>` +7, `<|eom_id|>` +8, `<|eot_id|>` +9,
`<|python_tag|>` +10) are those of Llama 3.0 through 3.3.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import json
import logging
import shutil
from pathlib import Path
from typing import Iterator, Sequence

from ft.errors import AssetError
from ft.tokenizers.base import Tokenizer

log = logging.getLogger(__name__)

PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_SPECIAL_TOKENS = 256

NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]

# tiktoken's Rust core recurses on very long inputs; Meta splits text below these sizes.
MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACE_CHARS = 25_000


def special_tokens() -> list[str]:
    reserved = [
        f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))
    ]
    return NAMED_SPECIAL_TOKENS + reserved


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """The `token -> rank` table of a tiktoken BPE file, with errors that name the line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise AssetError(
                    f"{path}:{line_number}: expected '<base64 token> <rank>' (a tiktoken BPE file, "
                    f"as Llama 3's tokenizer.model), got {line[:80]!r}"
                )
            try:
                token = base64.b64decode(parts[0], validate=True)
            except binascii.Error:
                raise AssetError(f"{path}:{line_number}: {parts[0][:60]!r} is not valid base64") from None
            rank = int(parts[1])
            if token in ranks:
                raise AssetError(f"{path}:{line_number}: token {token!r} appears twice")
            ranks[token] = rank
    if not ranks:
        raise AssetError(f"tiktoken BPE file {path} is empty")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise AssetError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once")
    return ranks


class Llama3Tokenizer(Tokenizer):
    family = "llama3"
    chat_format = "llama3"

    def __init__(self, path: str | Path, *, use_eot: bool = False) -> None:
        import tiktoken

        self.path = Path(path)
        self.use_eot = use_eot
        self.mergeable_ranks = read_tiktoken_ranks(self.path)
        self.num_base_tokens = len(self.mergeable_ranks)
        self.special_tokens = {
            token: self.num_base_tokens + i for i, token in enumerate(special_tokens())
        }
        self._id_to_special = {i: token for token, i in self.special_tokens.items()}
        self.model = tiktoken.Encoding(
            name=self.path.name,
            pat_str=PATTERN,
            mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.vocab_size = self.num_base_tokens + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]

    @property
    def stop_ids(self) -> list[int]:
        # Meta stops on <|eom_id|> too: tool calls end a message without ending the turn.
        return [self.eos_id, self.eot_id, self.eom_id]

    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False, *, allow_special: bool = False
    ) -> list[int]:
        ids: list[int] = [self.bos_id] if add_bos else []
        allowed = "all" if allow_special else set()
        for chunk in _chunks(text):
            # disallowed_special=() keeps special-token text as plain text rather than raising.
            ids.extend(self.model.encode(chunk, allowed_special=allowed, disallowed_special=()))
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i < self.num_base_tokens]
        return self.model.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.mergeable_ranks.get(token.encode("utf-8"))

    def id_to_token(self, token_id: int) -> str:
        if token_id in self._id_to_special:
            return self._id_to_special[token_id]
        return self.model.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")


    def save_hf(self, out_dir: str | Path) -> None:
        """tokenizer.json (a byte-level BPE equal to tiktoken), tokenizer_config.json with
        the chat template, and Meta's file as original/tokenizer.model (the layout of
        Meta's Hugging Face repos, readable by ft without the `tokenizers` package).

        Without `tokenizers` installed, tokenizer.json is skipped with a warning, so a
        checkpoint save never fails for want of an optional package."""
        out = Path(out_dir)
        (out / "original").mkdir(parents=True, exist_ok=True)
        if self.path.resolve() != (out / "original" / "tokenizer.model").resolve():
            shutil.copyfile(self.path, out / "original" / "tokenizer.model")
        if importlib.util.find_spec("tokenizers") is None:
            log.warning(
                "not writing %s: converting the Llama 3 tokenizer to tokenizer.json needs the "
                "`tokenizers` package (pip install 'ft[hf]'); transformers cannot read this directory's tokenizer",
                out / "tokenizer.json",
            )
        else:
            from ft.tokenizers.hf_export import tiktoken_to_hf_tokenizer

            hf_tokenizer = tiktoken_to_hf_tokenizer(
                self.mergeable_ranks,
                pattern=PATTERN,
                special_tokens=self.special_tokens,
                bos_token="<|begin_of_text|>",
            )
            hf_tokenizer.save(str(out / "tokenizer.json"))
        eos_token = "<|eot_id|>" if self.use_eot else "<|end_of_text|>"
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|begin_of_text|>",
            "eos_token": eos_token,
            "pad_token": None,
            "add_bos_token": True,
            "add_eos_token": False,
            # Llama 3's own config sets this True, which makes decode() drop spaces
            # before punctuation ("a ." -> "a."); tiktoken does not, so neither do we.
            "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072,
            "chat_template": self.chat_template(),
            "added_tokens_decoder": {
                str(i): _added_token(token) for token, i in self.special_tokens.items()
            },
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        special_map = {"bos_token": "<|begin_of_text|>", "eos_token": eos_token}
        (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def _added_token(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _chunks(text: str) -> Iterator[str]:
    """`text` cut as Meta cuts it before tiktoken: pieces of at most 400k characters,
    each cut again wherever a run of only-whitespace or only-non-whitespace exceeds 25k."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        yield from _split_long_runs(text[start : start + MAX_ENCODE_CHARS], MAX_NO_WHITESPACE_CHARS)
    if not text:
        yield ""


def _split_long_runs(s: str, max_run: int) -> Iterator[str]:
    run_length = 0
    run_is_space = s[0].isspace() if s else False
    slice_start = 0
    for i, char in enumerate(s):
        is_space = char.isspace()
        if is_space != run_is_space:
            run_length = 1
            run_is_space = is_space
        else:
            run_length += 1
            if run_length > max_run:
                yield s[slice_start:i]
                slice_start = i
                run_length = 1
    yield s[slice_start:]
