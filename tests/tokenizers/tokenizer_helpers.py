"""Helpers for the tokenizer tests: tiny tokenizers trained in the test run (a
SentencePiece BPE model and a Llama 3-format tiktoken BPE file) and varied text."""

from __future__ import annotations

import base64
import collections
import io
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you doing today? I'm fine, thanks; we'll see.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 1,000,000",
    "def main():\n    return {'key': [1, 2, 3]}\n",
    "Fine-tuning large language models with a small learning rate works well.",
    "Café, naïve, résumé, Zürich, São Paulo, 日本語のテキスト, Привет мир, 😀🚀",
    "User: what is 12 + 30?\nAssistant: 12 + 30 = 42\n#### 42",
    "    indented   text\twith\ttabs and    runs of spaces\n\n\nand blank lines",
] * 20

VARIED_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and   runs of   spaces  ",
    "digits 1234567890 and 3.14159 and 007",
    "unicode: café naïve Zürich 日本語 Привет",
    "emoji 🤖🎉👍🏽 and a flag 🇫🇷",
    "tabs\tand\nnewlines\n\n\nand\r\nwindows line ends",
    "",
    " ",
    "\n",
    "I'm sure they'll say we've DONE it; it's 'quoted'.",
    "<|eot_id|> and <s> and </s> in plain text stay plain text",
    "def f(x):\n    return x ** 2  # square\n",
    "zzzqqqxxx unseen rare words: pneumonoultramicroscopic",
]


def train_byte_bpe_ranks(texts: list[str], num_merges: int) -> dict[bytes, int]:
    """Byte-level BPE ranks (tiktoken's `mergeable_ranks`) learned on `texts`, split
    with the Llama 3 pattern: ranks 0-255 are the bytes, then one rank per merge."""
    import regex

    from ft.tokenizers.llama3 import PATTERN

    words = collections.Counter()
    for text in texts:
        for piece in regex.findall(PATTERN, text):
            words[tuple(bytes([b]) for b in piece.encode("utf-8"))] += 1
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        # Most frequent pair; ties broken by the bytes so the result is deterministic.
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        merged = best[0] + best[1]
        ranks[merged] = len(ranks)
        new_words = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    return ranks


def write_tiktoken_file(ranks: dict[bytes, int], path: Path) -> Path:
    """Llama 3's tokenizer.model format: `<base64 token> <rank>` per line."""
    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    return path


def train_sentencepiece(texts: list[str], path: Path, vocab_size: int = 400) -> Path:
    """A Llama 2-style SentencePiece BPE model (byte fallback, digits split, no normalization)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path
