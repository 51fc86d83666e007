"""Resolving `dataset=` and reading a split into tokenized examples or prompts.

`dataset` is one of:

- an existing `.jsonl` file: the whole dataset (its only split);
- a directory, fairseq2 layout: each subfolder is a split (`DIR/train/*.jsonl`,
  `DIR/valid/*.jsonl`, searched recursively); without subfolders, files named by
  split (`train.jsonl`, `test.jsonl`, `train-00001.jsonl`, as HF exports write
  them) form those splits, and otherwise every `*.jsonl` file is the train split;
- an asset card name (`ft.assets.resolve_card_or_path` tells names from paths)
  whose `data` field is such a file or directory and whose
  optional `dataset_family` forces the row format.

Split names `valid`, `validation` and `dev` are interchangeable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

from ft.assets import resolve_card_or_path
from ft.data.formats import (
    DataTokenizer,
    Example,
    PromptRow,
    RowError,
    detect_format,
    normalize_format,
    row_to_example,
    row_to_prompt,
)
from ft.data.jsonl import MalformedLine, iter_jsonl
from ft.errors import AssetError, DataError

_SPLIT_GROUPS = (("train",), ("valid", "validation", "dev"), ("test",))
_SPLIT_NAMES = tuple(name for group in _SPLIT_GROUPS for name in group)


@dataclass(frozen=True)
class DatasetSource:
    """The files of one split of a dataset, and the row format its card forces (if any)."""

    name: str  # what the user typed, for messages
    split: str | None
    files: tuple[Path, ...]
    format: str | None = None

    @property
    def description(self) -> str:
        """`dataset NAME split 'S'`, for log lines and messages."""
        split = f" split '{self.split}'" if self.split else ""
        return f"dataset {self.name}{split}"


@dataclass
class DatasetStats:
    """What reading a split kept and dropped; the trainer logs it."""

    num_rows: int = 0  # non-blank lines read
    num_examples: int = 0  # examples kept
    num_malformed: int = 0  # malformed lines skipped (skip_malformed)
    num_too_long: int = 0  # examples longer than max_seq_len (dropped or truncated)
    num_truncated: int = 0
    num_dropped_too_long: int = 0
    num_no_target: int = 0  # dropped: no target token left to learn
    num_tokens: int = 0  # in kept examples
    num_target_tokens: int = 0  # in kept examples
    malformed: list[str] = field(default_factory=list)  # the first few skipped lines, file:line: why

    def summary(self) -> str:
        parts = [f"{self.num_examples} examples from {self.num_rows} rows", f"{self.num_tokens} tokens"]
        parts.append(f"{self.num_target_tokens} target tokens")
        if self.num_truncated:
            parts.append(f"{self.num_truncated} truncated to max_seq_len")
        if self.num_dropped_too_long:
            parts.append(f"{self.num_dropped_too_long} dropped as longer than max_seq_len")
        if self.num_no_target:
            parts.append(f"{self.num_no_target} dropped without target tokens")
        if self.num_malformed:
            parts.append(f"{self.num_malformed} malformed lines skipped (first: {self.malformed[0]})")
        return ", ".join(parts)


class ExampleSet(list):
    """The kept examples of a split (a plain list of `Example`) with their `stats` and `source`."""

    def __init__(self, examples: Sequence[Example], stats: DatasetStats, source: DatasetSource) -> None:
        super().__init__(examples)
        self.stats = stats
        self.source = source


def resolve_dataset(dataset: str | os.PathLike[str], split: str | None = "train") -> DatasetSource:
    """The files of `split` of `dataset` (a path or a card name); see the module docstring.

    `split=None` takes the dataset's only split (a single file, or a directory with
    one split) and is an error when there are several.
    """
    name = str(dataset)
    path, fmt = _locate(name)
    if path.is_file():
        if split is not None and _canonical(split) != "train":
            raise DataError(
                f"dataset {name} is a single file, so it has no '{split}' split; make a directory "
                f"with one subfolder per split (train/, {split}/) to have one"
            )
        return DatasetSource(name, split, (path,), fmt)
    if not path.is_dir():
        raise DataError(f"dataset {name} is neither a file nor a directory (a device or a pipe?); "
                        "give a .jsonl file or a directory of them")
    splits = discover_splits(path)
    if not splits:
        raise DataError(f"dataset directory {path} holds no .jsonl files")
    if split is None:
        if len(splits) > 1:
            raise DataError(f"dataset {name} has several splits ({', '.join(splits)}); choose one")
        (key,) = splits
    else:
        matches = [key for key in splits if _canonical(key) == _canonical(split)]
        if not matches:
            raise DataError(f"dataset {name} has no '{split}' split; it has: {', '.join(splits)}")
        if len(matches) > 1:
            raise DataError(f"dataset {name} has several folders for split '{split}': {', '.join(matches)}")
        (key,) = matches
    return DatasetSource(name, key, tuple(splits[key]), fmt)


def available_splits(dataset: str | os.PathLike[str]) -> list[str]:
    """Split names of `dataset` (a single file has just `train`)."""
    path, _ = _locate(str(dataset))
    return ["train"] if path.is_file() else list(discover_splits(path))


def discover_splits(directory: Path) -> dict[str, list[Path]]:
    """{split name: sorted .jsonl files} of a dataset directory."""
    subdirs = {
        d.name: sorted(d.rglob("*.jsonl"))
        for d in sorted(directory.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }
    splits = {name: files for name, files in subdirs.items() if files}
    top = sorted(p for p in directory.glob("*.jsonl") if p.is_file())
    named = {p: _split_of_file(p) for p in top}
    unnamed = [p for p, s in named.items() if s is None]
    if unnamed and (splits or len(unnamed) < len(top)):
        raise DataError(
            f"dataset directory {directory} mixes split folders or split-named files (train.jsonl, "
            f"valid.jsonl, ...) with {unnamed[0].name}, which belongs to no split; move it into a "
            "split folder such as train/"
        )
    if unnamed:
        return {"train": unnamed}
    for p, s in named.items():
        key = next((k for k in splits if _canonical(k) == _canonical(s)), s)
        splits.setdefault(key, []).append(p)
    return splits


def _split_of_file(path: Path) -> str | None:
    stem = path.name[: -len(".jsonl")]
    for name in _SPLIT_NAMES:
        if stem == name or (stem.startswith(name) and stem[len(name)] in "-_."):
            return name
    return None


def _canonical(split: str) -> str:
    for group in _SPLIT_GROUPS:
        if split in group:
            return group[0]
    return split


def _locate(name: str) -> tuple[Path, str | None]:
    """(file or directory, format forced by a card) for a path or a card name."""
    try:
        found = resolve_card_or_path(name, what="dataset")
    except AssetError as err:
        raise DataError(str(err)) from None
    if isinstance(found, Path):
        return found, None
    card = found
    data = card.path("data")
    fmt = card.get("dataset_family")
    if fmt is not None:
        try:
            fmt = normalize_format(fmt)
        except DataError as err:
            raise DataError(f"card '{card.name}': dataset_family: {err}") from None
    return data, fmt


def _rows(
    source: DatasetSource, skip_malformed: bool, stats: DatasetStats, skip_hint: str | None = None
) -> Iterator[tuple[Path, int, dict]]:
    """Yield (path, line, row) for each usable row, raising or counting malformed ones."""
    for path in source.files:
        for line_no, row in iter_jsonl(path):
            stats.num_rows += 1
            if isinstance(row, MalformedLine):
                _malformed(row, skip_malformed, stats, skip_hint)
                continue
            yield path, line_no, row


# The config key that skips malformed lines, for the error's hint (the training recipes have it).
SKIP_MALFORMED_HINT = "set skip_malformed_lines=true to skip such lines"


def _malformed(bad: MalformedLine, skip_malformed: bool, stats: DatasetStats, skip_hint: str | None = None) -> None:
    if not skip_malformed:
        raise DataError(bad.message() + (f" ({skip_hint})" if skip_hint else ""))
    stats.num_malformed += 1
    if len(stats.malformed) < 5:
        stats.malformed.append(bad.message())


def read_examples(
    dataset: str | os.PathLike[str] | DatasetSource,
    tokenizer: DataTokenizer,
    *,
    split: str = "train",
    format: str | None = None,
    max_seq_len: int | None = None,
    on_too_long: Literal["drop", "truncate"] = "drop",
    skip_malformed: bool = False,
) -> ExampleSet:
    """Read and tokenize a split into training examples.

    Examples longer than `max_seq_len` are dropped or truncated (keeping the start)
    per `on_too_long`; examples with no target token to learn are dropped; both are
    counted in the result's `stats`. A malformed line is a `DataError` naming
    `file:line` unless `skip_malformed`, which skips and counts it. `format` forces
    a row format (see `ft.data.formats`); otherwise each row's keys decide.
    """
    if on_too_long not in ("drop", "truncate"):
        raise DataError(f"on_too_long must be 'drop' or 'truncate', got {on_too_long!r}")
    if max_seq_len is not None and max_seq_len < 2:
        raise DataError(f"max_seq_len must be at least 2, got {max_seq_len}")
    source = dataset if isinstance(dataset, DatasetSource) else resolve_dataset(dataset, split)
    fmt = normalize_format(format) or source.format
    stats = DatasetStats()
    examples: list[Example] = []
    for path, line_no, row in _rows(source, skip_malformed, stats, SKIP_MALFORMED_HINT):
        try:
            example = row_to_example(row, tokenizer, fmt or detect_format(row))
        except RowError as err:
            _malformed(MalformedLine(path, line_no, str(err)), skip_malformed, stats, SKIP_MALFORMED_HINT)
            continue
        if max_seq_len is not None and len(example) > max_seq_len:
            stats.num_too_long += 1
            if on_too_long == "drop":
                stats.num_dropped_too_long += 1
                continue
            stats.num_truncated += 1
            example = Example(example.tokens[:max_seq_len], example.target_mask[:max_seq_len])
        num_targets = example.num_target_tokens
        if num_targets == 0:
            stats.num_no_target += 1
            continue
        stats.num_examples += 1
        stats.num_tokens += len(example)
        stats.num_target_tokens += num_targets
        examples.append(example)
    if stats.num_rows == 0:
        raise DataError(f"{source.description} is empty: no rows in {_files(source)}")
    if not examples:
        raise DataError(f"{source.description} has no usable examples: {_why_empty(stats, max_seq_len)}")
    return ExampleSet(examples, stats, source)


def read_prompts(
    dataset: str | os.PathLike[str] | DatasetSource,
    tokenizer: DataTokenizer,
    *,
    split: str | None = None,
    format: str | None = None,
    skip_malformed: bool = False,
) -> list[PromptRow]:
    """Every row of a split as a generation prompt with its reference answer, in file order.

    Rows need only their prompt fields (`src`, `question`, `instruction`, or
    `messages`); a target field, or a final assistant message, becomes `reference`.
    Chat prompts are rendered with the generation prompt appended.
    """
    source = dataset if isinstance(dataset, DatasetSource) else resolve_dataset(dataset, split)
    fmt = normalize_format(format) or source.format
    stats = DatasetStats()
    prompts: list[PromptRow] = []
    for path, line_no, row in _rows(source, skip_malformed, stats):
        try:
            prompts.append(row_to_prompt(row, tokenizer, len(prompts), fmt))
        except RowError as err:
            _malformed(MalformedLine(path, line_no, str(err)), skip_malformed, stats)
    if not prompts:
        if stats.num_rows == 0:
            raise DataError(f"{source.description} is empty: no rows in {_files(source)}")
        raise DataError(f"{source.description} has no usable prompts ({stats.num_malformed} malformed lines)")
    return prompts


def _files(source: DatasetSource) -> str:
    names = [str(p) for p in source.files[:3]]
    more = f" and {len(source.files) - 3} more" if len(source.files) > 3 else ""
    return ", ".join(names) + more


def _why_empty(stats: DatasetStats, max_seq_len: int | None) -> str:
    reasons = [f"{stats.num_rows} rows"]
    if stats.num_malformed:
        reasons.append(f"{stats.num_malformed} malformed")
    if stats.num_dropped_too_long:
        reasons.append(f"{stats.num_dropped_too_long} longer than max_seq_len={max_seq_len} (raise it, or truncate)")
    if stats.num_no_target:
        reasons.append(f"{stats.num_no_target} without target tokens")
    return ", ".join(reasons)

