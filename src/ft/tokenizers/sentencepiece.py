"""The Llama 2 tokenizer: a SentencePiece model (also the embedded default's tokenizer).

Ids come from the model itself (`bos_id`, `eos_id`, `pad_id`; Llama 2 has no pad,
so `pad_id` is None). Llama 2 has no end-of-turn token: `eot_id` is None and
chat turns end with EOS, as in Meta's `chat_completion`.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path
from typing import Sequence

from ft.errors import AssetError
from ft.tokenizers.base import Tokenizer


class SentencePieceTokenizer(Tokenizer):
    family = "llama2"
    chat_format = "llama2"

    def __init__(self, path: str | Path, *, use_eot: bool = False) -> None:
        import sentencepiece as spm

        self.path = Path(path)
        self.use_eot = use_eot
        self.model = spm.SentencePieceProcessor()
        try:
            self.model.load(str(self.path))
        except (OSError, RuntimeError) as error:
            raise AssetError(f"{self.path} is not a SentencePiece model: {error}") from None
        self.vocab_size = self.model.get_piece_size()
        self.bos_id = _optional(self.model.bos_id())
        eos_id = _optional(self.model.eos_id())
        if eos_id is None:
            raise AssetError(f"SentencePiece model {self.path} has no EOS token (eos_id = -1); ft needs one")
        self.eos_id = eos_id
        self.pad_id = _optional(self.model.pad_id())
        self.eot_id = None
        # Control and user-defined pieces: what `allow_special` splits out of text and
        # what `skip_special_tokens` removes.
        self._special_ids = {
            i
            for i in range(self.vocab_size)
            if self.model.is_control(i) or self.model.is_unknown(i) or _is_user_defined(self.model, i)
        }
        self._special_pattern: re.Pattern[str] | None = None

    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False, *, allow_special: bool = False
    ) -> list[int]:
        if allow_special:
            ids = self._encode_with_specials(text)
        else:
            ids = self.model.encode(text)
        if add_bos:
            if self.bos_id is None:
                raise AssetError(f"SentencePiece model {self.path} has no BOS token (bos_id = -1)")
            ids = [self.bos_id, *ids]
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def _encode_with_specials(self, text: str) -> list[int]:
        # Like transformers' Llama tokenizer: special pieces are cut out of the text and
        # the text between them is encoded on its own (each part gets the dummy prefix).
        if self._special_pattern is None:
            tokens = sorted((self.model.id_to_piece(i) for i in self._special_ids), key=len, reverse=True)
            self._special_pattern = re.compile("|".join(re.escape(t) for t in tokens))
        ids: list[int] = []
        position = 0
        for match in self._special_pattern.finditer(text):
            if match.start() > position:
                ids += self.model.encode(text[position : match.start()])
            ids.append(self.model.piece_to_id(match.group()))
            position = match.end()
        if position < len(text):
            ids += self.model.encode(text[position:])
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self.model.decode([i for i in ids if i not in self._special_ids])
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._special_ids:
                if run:
                    parts.append(self.model.decode(run))
                    run = []
                parts.append(self.model.id_to_piece(i))
            else:
                run.append(i)
        if run:
            parts.append(self.model.decode(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        token_id = self.model.piece_to_id(token)
        # piece_to_id answers unk_id for anything unknown.
        if token_id == self.model.unk_id() and token != self.model.id_to_piece(token_id):
            return None
        return token_id

    def id_to_token(self, token_id: int) -> str:
        return self.model.id_to_piece(token_id)


    def save_hf(self, out_dir: str | Path) -> None:
        """tokenizer.model, tokenizer_config.json and special_tokens_map.json (what
        LlamaTokenizer reads), plus tokenizer.json when `tokenizers` is installed, so
        transformers need not convert the SentencePiece model itself (that needs protobuf)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.path.resolve() != (out / "tokenizer.model").resolve():
            shutil.copyfile(self.path, out / "tokenizer.model")
        if importlib.util.find_spec("tokenizers") is not None:
            from ft.tokenizers.hf_export import sentencepiece_to_hf_tokenizer

            sentencepiece_to_hf_tokenizer(self.model).save(str(out / "tokenizer.json"))
        bos = self.model.id_to_piece(self.bos_id) if self.bos_id is not None else None
        eos = self.model.id_to_piece(self.eos_id)
        unk = self.model.id_to_piece(self.model.unk_id())
        pad = self.model.id_to_piece(self.pad_id) if self.pad_id is not None else None
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast" if (out / "tokenizer.json").is_file() else "LlamaTokenizer",
            "bos_token": bos,
            "eos_token": eos,
            "unk_token": unk,
            "pad_token": pad,
            "add_bos_token": bos is not None,
            "add_eos_token": False,
            "legacy": True,
            "add_prefix_space": None,
            "clean_up_tokenization_spaces": False,
            "sp_model_kwargs": {},
            "model_max_length": 4096,
            "chat_template": self.chat_template(),
            "added_tokens_decoder": {
                str(i): {
                    "content": self.model.id_to_piece(i),
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
                for i in sorted(self._special_ids)
            },
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        special_map = {k: v for k, v in {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}.items() if v}
        (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def _optional(token_id: int) -> int | None:
    return None if token_id < 0 else token_id


def _is_user_defined(model, token_id: int) -> bool:
    # Older sentencepiece releases lack is_user_defined.
    check = getattr(model, "IsUserDefined", None) or getattr(model, "is_user_defined", None)
    return bool(check(token_id)) if check is not None else False
