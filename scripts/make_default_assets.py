#!/usr/bin/env python
"""Make ft's embedded default assets: a synthetic instruction dataset, its tokenizer and the tiny model.

    python scripts/make_default_assets.py [--out-dir src/ft/assets/default]

Writes, from one fixed seed (`SEED`), everything the `ft_tiny` and `ft_default_sft`
cards in `src/ft/assets/cards/default.yaml` point at, then prints a sha256 prefix and
the size of every file written:

- sft/{train,valid,test}/data.jsonl: fairseq2-layout rows `{"src": ..., "tgt": ...}`
  (3000 / 200 / 200, no `src` shared between splits) of ten small tasks a ~1M-parameter
  model learns in a few hundred steps: two-number addition and subtraction, a one-line
  word problem, counting words, next number, and word reversal, sorting, copying,
  upper-casing and spelling. The arithmetic, word-problem, counting and next-number
  answers end with GSM8K's final line `#### <answer>`, so `ft lm generate`'s GSM8K
  scorer grades them. `src` ends with "\\n"; `tgt` is the answer alone (the data
  pipeline adds BOS/EOS).
- tokenizer.model: a SentencePiece BPE model trained on that text plus the Llama 2
  chat markers and the word list in three casings, in Llama 2's layout: vocab_size
  1024, unk 0 (`<unk>`), bos 1 (`<s>`), eos 2 (`</s>`), no pad (pad_id -1: padding
  is masked by the data pipeline, any id will do), byte fallback so any text
  encodes, digits split, no normalization. Its `tokenizer_family` is `llama2`
  (Llama 2 chat template). Trained on one thread without sampling, so the bytes are
  the same on every run.
- model/: the tiny model (arch `ft_tiny`, random init from `SEED`) in the Hugging
  Face layout: bf16 `model.safetensors`, `config.json`, `generation_config.json` and
  the tokenizer files, so the default card loads with ft and with transformers alike.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
from pathlib import Path

SEED = 20240601
VOCAB_SIZE = 1024
SPLITS = {"train": 3000, "valid": 200, "test": 200}

DEFAULT_OUT_DIR = Path(__file__).resolve().parent.parent / "src" / "ft" / "assets" / "default"

# A fixed list of short, common English words: the vocabulary of the word tasks.
WORDS = """
apple arm baby back ball bank bed bell bird black blue boat body bone book box
boy bread brown cake car cat chair child city clock cloud coat cold cow cup day
desk dog door duck dust ear earth egg end eye face farm fish flag floor flower
foot fork game garden girl glass gold grass green hand hat head heart hill home
horse house ice ink iron jam key king kite lake lamp leaf leg light line lion
lock map milk moon mouse nail neck nest net night nose nut oil orange owl page
pen pig pin pipe plant plate pot queen rain red ring river road rock roof room
root rose salt sand sea seed sheep ship shoe sky snow sock song star stone sun
table tail tea tent tiger time toe tooth town toy train tree van wall water
wave week wheel white wind window wing winter wolf wood wool word yard year
""".split()

NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return f"What is {a} + {b}?\n", f"{a} + {b} = {a + b}\n#### {a + b}"


def _subtraction(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(0, 50)
    b = rng.randint(0, a)
    return f"What is {a} - {b}?\n", f"{a} - {b} = {a - b}\n#### {a - b}"


def _word_problem(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(["Ann", "Bob", "Cai", "Dee", "Eli", "Fay"])
    thing = rng.choice(["apples", "books", "cups", "eggs", "hats", "pens"])
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    question = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?\n"
    return question, f"{name} has {a} + {b} = {a + b} {thing}.\n#### {a + b}"


def _count(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(1, 7))
    return f"How many words: {' '.join(words)}\n", f"There are {len(words)} words.\n#### {len(words)}"


def _next_number(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 98)
    return f"What number comes after {n}?\n", f"{n} + 1 = {n + 1}\n#### {n + 1}"


def _words(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(2, 5))


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = _words(rng)
    return f"Reverse the words: {' '.join(words)}\n", " ".join(reversed(words))


def _sort(rng: random.Random) -> tuple[str, str]:
    words = _words(rng)
    return f"Sort the words: {' '.join(words)}\n", " ".join(sorted(words))


def _copy(rng: random.Random) -> tuple[str, str]:
    words = _words(rng)
    return f"Repeat: {' '.join(words)}\n", " ".join(words)


def _upper(rng: random.Random) -> tuple[str, str]:
    words = _words(rng)
    return f"Uppercase: {' '.join(words)}\n", " ".join(words).upper()


def _spell(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"Spell the word: {word}\n", " ".join(word)


TASKS = [
    _addition,
    _subtraction,
    _word_problem,
    _count,
    _next_number,
    _reverse,
    _sort,
    _copy,
    _upper,
    _spell,
]


def make_dataset(seed: int = SEED) -> dict[str, list[dict[str, str]]]:
    """{split: rows}; no `src` is shared between splits, so valid/test measure generalization."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {}
    for split, size in SPLITS.items():
        rows = []
        while len(rows) < size:
            # Tasks with few distinct prompts (next number, spelling) get rarer once
            # their prompts are used up; the others have thousands, so this ends.
            src, tgt = rng.choice(TASKS)(rng)
            if src in seen:
                continue
            seen.add(src)
            rows.append({"src": src, "tgt": tgt})
        rng.shuffle(rows)
        splits[split] = rows
    return splits


def write_dataset(out_dir: Path, splits: dict[str, list[dict[str, str]]]) -> None:
    for split, rows in splits.items():
        path = out_dir / "sft" / split / "data.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def tokenizer_corpus(splits: dict[str, list[dict[str, str]]]) -> list[str]:
    """The tokenizer's training text: every row, plus the chat markers and the word
    list in three casings, so the 1024-piece vocabulary is filled with useful pieces."""
    lines = [row["src"] + row["tgt"] for rows in splits.values() for row in rows]
    lines += ["[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n [/INST]"] * 20
    for word in WORDS + NUMBER_WORDS:
        lines += [word, word.capitalize(), word.upper()]
    return lines


def train_tokenizer(lines: list[str]) -> bytes:
    """A SentencePiece BPE model (serialized) trained on `lines`, in Llama 2's layout."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # One thread and no sampling or shuffling: the same bytes on every run.
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        max_sentence_length=4096,
        minloglevel=2,
    )
    return model.getvalue()


def make_default_model(out_dir: Path) -> None:
    """The tiny model (arch `ft_tiny`): random init from a fixed seed, saved in the
    Hugging Face layout (bf16 safetensors + config.json + the tokenizer files), so
    the default card loads with ft and with transformers alike."""
    import torch

    from ft.models import build_model
    from ft.models.hf_export import save_hf_model
    from ft.tokenizers import load_tokenizer

    model = build_model("ft_tiny", device="cpu", seed=SEED)
    tokenizer = load_tokenizer(str(out_dir / "tokenizer.model"))
    save_hf_model(model, out_dir / "model", dtype=torch.bfloat16, tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    splits = make_dataset()
    write_dataset(out_dir, splits)
    (out_dir / "tokenizer.model").write_bytes(train_tokenizer(tokenizer_corpus(splits)))
    make_default_model(out_dir)

    for path in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        print(f"{digest}  {path.stat().st_size:>8}  {path.relative_to(out_dir)}")


if __name__ == "__main__":
    main()
