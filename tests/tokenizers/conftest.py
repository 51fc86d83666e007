"""Fixtures for the tokenizer tests: tiny tokenizers trained in the session."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizer_helpers import CORPUS, train_byte_bpe_ranks, train_sentencepiece, write_tiktoken_file


@pytest.fixture(scope="session")
def tiktoken_file(tmp_path_factory) -> Path:
    ranks = train_byte_bpe_ranks(CORPUS, num_merges=300)
    return write_tiktoken_file(ranks, tmp_path_factory.mktemp("llama3") / "tokenizer.model")


@pytest.fixture(scope="session")
def sentencepiece_file(tmp_path_factory) -> Path:
    return train_sentencepiece(CORPUS, tmp_path_factory.mktemp("llama2") / "tokenizer.model")
