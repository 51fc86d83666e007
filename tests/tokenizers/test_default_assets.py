"""The embedded default tokenizer and dataset (src/ft/assets/default), and the script that makes them."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import sentencepiece as spm

import ft
from ft.tokenizers import load_tokenizer
from ft.tokenizers.sentencepiece import SentencePieceTokenizer

DEFAULT_DIR = Path(ft.__file__).parent / "assets" / "default"
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_default_assets.py"
SPLIT_SIZES = {"train": 3000, "valid": 200, "test": 200}


def read_split(split: str) -> list[dict]:
    with open(DEFAULT_DIR / "sft" / split / "data.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_default_tokenizer_layout():
    tok = load_tokenizer(DEFAULT_DIR / "tokenizer.model")
    assert isinstance(tok, SentencePieceTokenizer)
    # What the ft_tiny arch is built for.
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (1024, 1, 2, None)
    assert tok.id_to_token(0) == "<unk>"
    # Byte fallback: text the tokenizer never saw still encodes without <unk>.
    text = "Ωμέγα ☃ 🦙 \t tabs"
    assert 0 not in tok.encode(text) and tok.decode(tok.encode(text)) == text


def test_default_dataset_splits_and_round_trip():
    tok = load_tokenizer(DEFAULT_DIR / "tokenizer.model")
    sources = {}
    for split, size in SPLIT_SIZES.items():
        rows = read_split(split)
        assert len(rows) == size
        sources[split] = {row["src"] for row in rows}
        for row in rows:
            assert set(row) == {"src", "tgt"} and row["src"].endswith("\n") and row["tgt"]
            for text in (row["src"], row["tgt"]):
                ids = tok.encode(text)
                assert 0 not in ids  # no <unk>
                assert tok.decode(ids) == text
            answer = re.search(r"\n#### (\S+)$", row["tgt"])
            if answer is not None:
                assert answer.group(1).isdigit()
        # Short examples: a few dozen tokens each, so a tiny model trains on a CPU.
        assert max(len(tok.encode_prompt(r["src"]) + tok.encode_response(r["tgt"])) for r in rows) < 64
    # Held-out prompts never appear in training.
    assert not sources["train"] & sources["valid"] and not sources["train"] & sources["test"]
    assert sum(r["tgt"].count("####") for r in read_split("test")) > 50  # GSM8K-scorable rows


def test_default_assets_are_small():
    files = [p for p in DEFAULT_DIR.rglob("*") if p.is_file() and p.suffix in (".model", ".jsonl")]
    assert sum(p.stat().st_size for p in files) < 1_000_000


@pytest.mark.slow
def test_script_reproduces_the_shipped_files_byte_for_byte(tmp_path):
    spec = importlib.util.spec_from_file_location("make_default_assets", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--out-dir", str(tmp_path)])
    for relative in ["tokenizer.model", *(f"sft/{split}/data.jsonl" for split in SPLIT_SIZES)]:
        assert (tmp_path / relative).read_bytes() == (DEFAULT_DIR / relative).read_bytes(), relative
    assert spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model")).get_piece_size() == 1024
