"""Hugging Face `tokenizer.json` tokenizers, through the optional `tokenizers` package.

Special tokens come from `tokenizer_config.json` next to the file when there is
one (as transformers reads them), else from well-known names in the vocabulary.
HF instruct configs name `<|eot_id|>` as EOS; ft keeps `<|end_of_text|>` as
`eos_id`, `<|eot_id|>` as `eot_id`, and sets `use_eot`, which is what they mean.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from ft.errors import AssetError
from ft.tokenizers.base import Tokenizer

BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>")
EOT_NAMES = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>")
PAD_NAMES = ("<|finetune_right_pad_id|>", "<pad>", "<|pad|>")


class HfTokenizer(Tokenizer):
    family = "hf"

    def __init__(self, path: str | Path, *, use_eot: bool = False) -> None:
        try:
            import tokenizers
        except ImportError:
            raise AssetError(
                f"reading {path} (a Hugging Face tokenizer.json) needs the `tokenizers` package: "
                "pip install 'ft[hf]'"
            ) from None
        self.path = Path(path)
        try:
            self.model = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as error:  # tokenizers raises a bare Exception on malformed JSON
            raise AssetError(f"{self.path} is not a valid tokenizer.json: {error}") from None
        self.config = _read_config(self.path.parent / "tokenizer_config.json")
        self.vocab_size = self.model.get_vocab_size(with_added_tokens=True)
        self._special_ids = {
            i for i, token in self.model.get_added_tokens_decoder().items() if token.special
        }
        self.chat_format = "llama3" if self.model.token_to_id("<|start_header_id|>") is not None else "llama2"

        self.bos_id = self._configured_id("bos_token", BOS_NAMES)
        self.pad_id = self._configured_id("pad_token", PAD_NAMES)
        self.eot_id = self._first_present(EOT_NAMES)
        eos_id = self._configured_id("eos_token", EOS_NAMES)
        self.use_eot = use_eot
        if eos_id is not None and eos_id == self.eot_id:
            self.use_eot = True
            eos_id = self._first_present(EOS_NAMES) or eos_id
        if eos_id is None:
            raise AssetError(
                f"cannot find the EOS token of {self.path}: set 'eos_token' in "
                f"{self.path.parent / 'tokenizer_config.json'} (none of {', '.join(EOS_NAMES)} is in the vocabulary)"
            )
        self.eos_id = eos_id

    @property
    def stop_ids(self) -> list[int]:
        ids = super().stop_ids
        eom_id = self.model.token_to_id("<|eom_id|>")  # Llama 3 tool calls end a message with it
        return ids + [eom_id] if eom_id is not None else ids

    def _first_present(self, names: Sequence[str]) -> int | None:
        for name in names:
            token_id = self.model.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def _configured_id(self, key: str, fallback_names: Sequence[str]) -> int | None:
        if key not in self.config:
            return self._first_present(fallback_names)
        value = self.config[key]
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            return None
        token_id = self.model.token_to_id(value)
        if token_id is None:
            raise AssetError(
                f"{self.path.parent / 'tokenizer_config.json'}: {key} {value!r} is not in the vocabulary of {self.path}"
            )
        return token_id

    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False, *, allow_special: bool = False
    ) -> list[int]:
        ids = self._encode(text, allow_special=allow_special).ids
        if add_bos:
            if self.bos_id is None:
                raise AssetError(f"tokenizer {self.path} has no BOS token")
            ids = [self.bos_id, *ids]
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def _encode(self, text: str, *, allow_special: bool) -> Any:
        # encode_special_tokens=True makes the tokenizer read "<|eot_id|>" in text as plain text.
        self.model.encode_special_tokens = not allow_special
        try:
            return self.model.encode(text, add_special_tokens=False)
        finally:
            self.model.encode_special_tokens = False

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.model.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.model.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        token = self.model.id_to_token(token_id)
        if token is None:
            raise IndexError(f"token id {token_id} is outside the vocabulary of {self.path} ({self.vocab_size})")
        return token


    def save_hf(self, out_dir: str | Path) -> None:
        """The same tokenizer.json, and tokenizer_config.json (ours, or a minimal one)
        with a chat template added when it has none."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.path.resolve() != (out / "tokenizer.json").resolve():
            shutil.copyfile(self.path, out / "tokenizer.json")
        config = dict(self.config)
        if not config:
            config = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": self.id_to_token(self.bos_id) if self.bos_id is not None else None,
                "eos_token": self.id_to_token(self.eot_id if self.use_eot and self.eot_id is not None else self.eos_id),
                "pad_token": self.id_to_token(self.pad_id) if self.pad_id is not None else None,
                "clean_up_tokenization_spaces": False,
            }
        config.setdefault("chat_template", self.chat_template())
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise AssetError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    if not isinstance(config, dict):
        raise AssetError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config
