"""Fixtures for the data tests: a byte-level tokenizer with the ft tokenizer API, a JSONL writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest


class ByteTokenizer:
    """Bytes shifted past 4 special ids; a tiny chat template `<role>\\n content <eot>`."""

    pad_id, bos_id, eos_id, eot_id = 0, 1, 2, 3
    stop_ids = (2, 3)
    vocab_size = 256 + 4

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [b + 4 for b in text.encode("utf-8")]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - 4 for i in ids if i >= 4).decode("utf-8", errors="replace")

    def encode_prompt(self, source: str) -> list[int]:
        return self.encode(source, add_bos=True)

    def encode_response(self, target: str) -> list[int]:
        return self.encode(target, add_eos=True)

    def encode_chat(self, messages, add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        ids, mask = [self.bos_id], [False]
        for m in messages:
            header = self.encode(f"<{m['role']}>\n")
            body = self.encode(m["content"]) + [self.eot_id]
            ids += header + body
            mask += [False] * len(header) + [m["role"] == "assistant"] * len(body)
        if add_generation_prompt:
            header = self.encode("<assistant>\n")
            ids += header
            mask += [False] * len(header)
        return ids, mask


@pytest.fixture
def tok() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """write_jsonl("a/train.jsonl", [row, ...]) -> path; a str row is written verbatim."""

    def write(relative: str, rows: Sequence[Any]) -> Path:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    return write
