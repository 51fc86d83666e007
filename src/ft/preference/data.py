"""Preference data: rows -> `PreferencePair`, pair micro-batches, the resumable reader.

Rows (JSONL, detected per row from their keys):

| fields                                  | prompt                               | responses |
|-----------------------------------------|--------------------------------------|-----------|
| `src`, `tgt_chosen`, `tgt_rejected` (fairseq2) | `src` as is (BOS + src)       | target + EOS/EOT |
| `prompt`, `chosen`, `rejected` strings (HF)    | `prompt` as is                | target + EOS/EOT |
| `prompt` messages, `chosen`/`rejected` messages (or strings) | the chat template | the final assistant turn |
| `chosen`, `rejected` whole conversations (no `prompt`) | their shared turns before the final assistant turn | the final assistant turn |

Chat rows are rendered with the tokenizer's chat template (`encode_chat`); only
the final assistant turn is a response, earlier assistant turns are prompt.
Chosen and rejected share the prompt's tokens: a pair is (prompt, chosen
response, rejected response), and its two sequences prompt+chosen and
prompt+rejected always land in the same micro-batch (their loss needs both).
A row that fits no format, and a pair whose responses are identical, are
errors naming file and line, or are skipped and counted with `skip_malformed`.

Batches: packed, the sequences of a micro-batch's pairs are placed first-fit into
`max_num_tokens // max_seq_len` rows of `max_seq_len` tokens (document ids keep
them apart); a pair that does not fit the open micro-batch starts the next one.
Unpacked, each sequence is its own row, padded to the micro-batch's longest. In
both, sequence 2k is the chosen and 2k+1 the rejected response of the batch's
k-th pair, and `sequence_ids_BT` gives each token's sequence (-1 on padding).
The reader is `ft.data.BatchReader` with this planner: the same global stream of
micro-batches, dp / accumulation split and resumable state as SFT.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch

from ft.data import BatchReader, resolve_dataset
from ft.data.formats import DataTokenizer, RowError
from ft.data.jsonl import MalformedLine, iter_jsonl
from ft.data.packing import IGNORE_INDEX, PAD_DOCUMENT_ID
from ft.errors import ConfigError, DataError

SKIP_HINT = "set skip_malformed_lines=true to skip such rows"
CHOSEN, REJECTED = 0, 1


@dataclass(frozen=True, slots=True)
class PreferencePair:
    """One tokenized pair: the shared prompt and the two responses (with their end token)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    def sequence(self, which: int) -> list[int]:
        return self.prompt + (self.chosen if which == CHOSEN else self.rejected)

    def length(self, which: int) -> int:
        return len(self.prompt) + len(self.chosen if which == CHOSEN else self.rejected)


@dataclass
class PairStats:
    num_rows: int = 0
    num_pairs: int = 0
    num_malformed: int = 0
    num_identical: int = 0
    num_truncated: int = 0
    num_dropped_too_long: int = 0
    num_tokens: int = 0
    num_target_tokens: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)  # the first few skipped rows, file:line: why

    def summary(self) -> str:
        parts = [f"{self.num_pairs} pairs from {self.num_rows} rows", f"{self.num_tokens} tokens",
                 f"{self.num_target_tokens} response tokens"]
        if self.num_truncated:
            parts.append(f"{self.num_truncated} truncated to max_seq_len")
        if self.num_dropped_too_long:
            parts.append(f"{self.num_dropped_too_long} dropped as longer than max_seq_len")
        if self.num_malformed or self.num_identical:
            parts.append(f"{self.num_malformed} malformed and {self.num_identical} identical-response rows skipped "
                         f"(first: {self.skipped[0]})")
        return ", ".join(parts)


class PairSet(list):
    """The kept pairs of a split with their `stats`, `description` and `fingerprint`."""

    def __init__(self, pairs: Sequence[PreferencePair], stats: PairStats, description: str) -> None:
        super().__init__(pairs)
        self.stats = stats
        self.description = description

    def fingerprint(self) -> str:
        """A hash of every pair's tokens: the stored reference log-probs belong to exactly these pairs."""
        digest = hashlib.sha256()
        for pair in self:
            for part in (pair.prompt, pair.chosen, pair.rejected):
                digest.update(len(part).to_bytes(4, "little"))
                digest.update(b"".join(t.to_bytes(4, "little") for t in part))
        return digest.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------- rows


def row_to_pair(row: dict[str, Any], tokenizer: DataTokenizer) -> PreferencePair:
    """Tokenize one preference row (see the module docstring); RowError when it fits no format."""
    if "tgt_chosen" in row or "tgt_rejected" in row or "src" in row:
        pair = _text_pair(tokenizer, _text(row, "src"), _text(row, "tgt_chosen"), _text(row, "tgt_rejected"))
    elif "chosen" in row or "rejected" in row:
        pair = _hf_pair(row, tokenizer)
    else:
        keys = ", ".join(sorted(row)) or "none"
        raise RowError(f"no preference fields (keys: {keys}); expected src/tgt_chosen/tgt_rejected "
                       "(fairseq2) or prompt/chosen/rejected (strings or chat messages)")
    if pair.chosen == pair.rejected:
        raise RowError("chosen and rejected responses are identical: the pair says nothing to prefer")
    return pair


def _text(row: dict[str, Any], key: str) -> str:
    if key not in row:
        raise RowError(f"missing field {key!r}")
    if not isinstance(row[key], str):
        raise RowError(f"field {key!r} must be a string, got {type(row[key]).__name__}")
    return row[key]


def _text_pair(tokenizer: DataTokenizer, prompt: str, chosen: str, rejected: str) -> PreferencePair:
    return PreferencePair(tokenizer.encode_prompt(prompt), tokenizer.encode_response(chosen),
                          tokenizer.encode_response(rejected))


def _hf_pair(row: dict[str, Any], tokenizer: DataTokenizer) -> PreferencePair:
    for key in ("chosen", "rejected"):
        if key not in row:
            raise RowError(f"missing field {key!r}")
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if isinstance(prompt, str) or (prompt is None and isinstance(chosen, str)):
        if prompt is None:
            raise RowError("missing field 'prompt' (string responses need a string prompt)")
        return _text_pair(tokenizer, prompt, _text(row, "chosen"), _text(row, "rejected"))
    if prompt is not None:  # prompt messages + response messages (or strings: one assistant turn)
        prompt_messages = _messages(prompt, "prompt")
        chosen_ids = _render(tokenizer, prompt_messages + _response_messages(chosen, "chosen"), "chosen")
        rejected_ids = _render(tokenizer, prompt_messages + _response_messages(rejected, "rejected"), "rejected")
    else:  # whole conversations: the prompt is what they share before the final assistant turn
        chosen_ids = _render(tokenizer, _messages(chosen, "chosen"), "chosen")
        rejected_ids = _render(tokenizer, _messages(rejected, "rejected"), "rejected")
    if chosen_ids[0] != rejected_ids[0]:
        raise RowError("'chosen' and 'rejected' differ before their final assistant turn; a pair shares its prompt")
    return PreferencePair(chosen_ids[0], chosen_ids[1], rejected_ids[1])


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RowError(f"field {key!r} must be a string or a non-empty list of {{role, content}} objects")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError(f"{key}[{i}] must be an object with string 'role' and 'content'")
    return value


def _response_messages(value: Any, key: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": value}] if isinstance(value, str) else _messages(value, key)


def _render(tokenizer: DataTokenizer, messages: list[dict[str, str]], key: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a conversation whose final turn is the response."""
    if messages[-1]["role"] != "assistant":
        raise RowError(f"{key!r} must end with an assistant turn, the response; it ends with "
                       f"{messages[-1]['role']!r}")
    try:
        ids, mask = tokenizer.encode_chat(messages)
    except DataError as err:
        raise RowError(str(err)) from None
    end = max((i + 1 for i, m in enumerate(mask) if m), default=0)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    if start == end:
        raise RowError(f"{key!r}: the chat template marks no response tokens")
    return list(ids[:start]), list(ids[start:end])


# ------------------------------------------------------------------------------------------- reading


def read_pairs(
    dataset: str | os.PathLike[str],
    tokenizer: DataTokenizer,
    *,
    split: str = "train",
    max_seq_len: int,
    on_too_long: Literal["drop", "truncate"] = "drop",
    skip_malformed: bool = False,
) -> PairSet:
    """Read and tokenize a split of preference rows.

    A sequence (prompt + response) longer than `max_seq_len` drops its pair, or is
    truncated keeping the start (`on_too_long`); a pair left with identical
    responses, or with no response token, is dropped.
    """
    source = resolve_dataset(dataset, split)
    stats = PairStats()
    pairs: list[PreferencePair] = []

    def skip(path: Path, line: int, reason: str, counter: str) -> None:
        message = MalformedLine(path, line, reason).message()
        if not skip_malformed:
            raise DataError(f"{message} ({SKIP_HINT})")
        setattr(stats, counter, getattr(stats, counter) + 1)
        if len(stats.skipped) < 5:
            stats.skipped.append(message)

    for path in source.files:
        for line, row in iter_jsonl(path):
            stats.num_rows += 1
            if isinstance(row, MalformedLine):
                skip(path, line, row.reason, "num_malformed")
                continue
            try:
                pair = row_to_pair(row, tokenizer)
            except RowError as err:
                counter = "num_identical" if "identical" in str(err) else "num_malformed"
                skip(path, line, str(err), counter)
                continue
            longest = max(pair.length(CHOSEN), pair.length(REJECTED))
            if longest > max_seq_len:
                room = max_seq_len - len(pair.prompt)
                if on_too_long == "drop" or room < 1:
                    stats.num_dropped_too_long += 1
                    continue
                pair = PreferencePair(pair.prompt, pair.chosen[:room], pair.rejected[:room])
                if pair.chosen == pair.rejected:
                    stats.num_dropped_too_long += 1
                    continue
                stats.num_truncated += 1
            stats.num_pairs += 1
            stats.num_tokens += pair.length(CHOSEN) + pair.length(REJECTED)
            stats.num_target_tokens += len(pair.chosen) + len(pair.rejected)
            pairs.append(pair)
    if not pairs:
        raise DataError(f"{source.description} has no usable preference pairs: {stats.summary()}")
    return PairSet(pairs, stats, source.description)


# ------------------------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class PreferenceBatch:
    """One micro-batch of pairs. Tensors are int64 `[B, T]` except `pair_index_P`."""

    tokens_BT: torch.Tensor
    labels_BT: torch.Tensor  # next-token targets within each sequence, -100 where no loss
    positions_BT: torch.Tensor
    document_ids_BT: torch.Tensor  # -1 on padding
    sequence_ids_BT: torch.Tensor  # 2k chosen / 2k+1 rejected of the batch's k-th pair; -1 on padding
    pair_index_P: torch.Tensor  # each pair's index in the PairSet (rows of the reference table)
    num_target_tokens: int
    num_tokens: int

    @property
    def num_pairs(self) -> int:
        return int(self.pair_index_P.shape[0])

    @property
    def num_examples(self) -> int:
        return self.num_pairs

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PreferenceBatch:
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                 for f in dataclasses.fields(self) if f.name.endswith("_BT")}
        return dataclasses.replace(self, **moved)


# A micro-batch plan: the pairs (PairSet indices) and rows of (local pair k, CHOSEN/REJECTED).
PairPlan = tuple[list[int], list[list[tuple[int, int]]]]


def plan_packed(pairs: Sequence[PreferencePair], order: Sequence[int], *, max_seq_len: int,
                batch_size: int) -> list[PairPlan]:
    plans: list[PairPlan] = []
    ids: list[int] = []
    rows: list[list[tuple[int, int]]] = [[] for _ in range(batch_size)]
    free = [max_seq_len] * batch_size
    for i in order:
        placed = _first_fit(free, [pairs[i].length(CHOSEN), pairs[i].length(REJECTED)])
        if placed is None:
            plans.append((ids, [r for r in rows if r]))
            ids, rows, free = [], [[] for _ in range(batch_size)], [max_seq_len] * batch_size
            placed = _first_fit(free, [pairs[i].length(CHOSEN), pairs[i].length(REJECTED)])
            if placed is None:
                raise ValueError(f"pair {i} does not fit an empty micro-batch of {batch_size} x {max_seq_len}")
        for which, r in enumerate(placed):
            rows[r].append((len(ids), which))
            free[r] -= pairs[i].length(which)
        ids.append(i)
    if ids:
        plans.append((ids, [r for r in rows if r]))
    return plans


def _first_fit(free: list[int], lengths: list[int]) -> list[int] | None:
    left = list(free)
    rows = []
    for n in lengths:
        r = next((r for r, f in enumerate(left) if n <= f), None)
        if r is None:
            return None
        left[r] -= n
        rows.append(r)
    return rows


def plan_unpacked(pairs: Sequence[PreferencePair], order: Sequence[int], *, max_num_tokens: int) -> list[PairPlan]:
    plans: list[PairPlan] = []
    ids: list[int] = []
    longest = 0
    for i in order:
        n = max(pairs[i].length(CHOSEN), pairs[i].length(REJECTED))
        if ids and 2 * (len(ids) + 1) * max(longest, n) > max_num_tokens:
            plans.append((ids, [[(k, w)] for k in range(len(ids)) for w in (CHOSEN, REJECTED)]))
            ids, longest = [], 0
        ids.append(i)
        longest = max(longest, n)
    if ids:
        plans.append((ids, [[(k, w)] for k in range(len(ids)) for w in (CHOSEN, REJECTED)]))
    return plans


def collate_pairs(pairs: Sequence[PreferencePair], plan: PairPlan, *, seq_len: int | None, num_rows: int,
                  pad_id: int) -> PreferenceBatch:
    ids, rows = plan
    lengths = [sum(pairs[ids[k]].length(w) for k, w in row) for row in rows]
    T = seq_len if seq_len is not None else max(lengths, default=1)
    B = max(num_rows, len(rows))
    tokens = torch.full((B, T), pad_id, dtype=torch.int64)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.int64)
    positions = torch.zeros((B, T), dtype=torch.int64)
    documents = torch.full((B, T), PAD_DOCUMENT_ID, dtype=torch.int64)
    sequences = torch.full((B, T), -1, dtype=torch.int64)
    num_targets = 0
    for b, row in enumerate(rows):
        t = 0
        for doc, (k, which) in enumerate(row):
            pair = pairs[ids[k]]
            seq = torch.tensor(pair.sequence(which), dtype=torch.int64)
            n, p = len(seq), len(pair.prompt)
            tokens[b, t:t + n] = seq
            # Position j predicts token j+1: a label wherever token j+1 is response.
            labels[b, t + p - 1:t + n - 1] = seq[p:]
            positions[b, t:t + n] = torch.arange(n)
            documents[b, t:t + n] = doc
            sequences[b, t:t + n] = 2 * k + which
            num_targets += n - p
            t += n
    return PreferenceBatch(tokens, labels, positions, documents, sequences, torch.tensor(ids, dtype=torch.int64),
                           num_target_tokens=num_targets, num_tokens=sum(lengths))


class PairPlanner:
    """`BatchReader`'s planner for pairs: `plan(order)` and `collate(plan)`."""

    def __init__(self, pairs: Sequence[PreferencePair], *, max_seq_len: int, max_num_tokens: int, packing: bool,
                 pad_id: int) -> None:
        if max_num_tokens < 2 * max_seq_len:
            raise ConfigError(f"max_num_tokens ({max_num_tokens}) must be at least 2 x max_seq_len ({max_seq_len}): "
                              "a micro-batch holds both sequences of a pair")
        if not pairs:
            raise DataError("no preference pairs to read")
        self.examples = pairs  # BatchReader shuffles and counts these
        self.max_seq_len, self.max_num_tokens, self.packing, self.pad_id = max_seq_len, max_num_tokens, packing, pad_id
        self.batch_size = max_num_tokens // max_seq_len

    def plan(self, order: Sequence[int]) -> list[PairPlan]:
        if self.packing:
            return plan_packed(self.examples, order, max_seq_len=self.max_seq_len, batch_size=self.batch_size)
        return plan_unpacked(self.examples, order, max_num_tokens=self.max_num_tokens)

    def collate(self, plan: PairPlan | list) -> PreferenceBatch:
        if not plan:  # an empty batch that fills out the last step of the data
            plan = ([], [])
        if self.packing:
            return collate_pairs(self.examples, plan, seq_len=self.max_seq_len, num_rows=self.batch_size,
                                 pad_id=self.pad_id)
        return collate_pairs(self.examples, plan, seq_len=None, num_rows=1, pad_id=self.pad_id)


def pair_reader(pairs: Sequence[PreferencePair], *, max_seq_len: int, max_num_tokens: int, seed: int, packing: bool,
                max_num_data_epochs: int | None, dp_size: int, dp_rank: int, gradient_accumulation: int,
                pad_id: int, shuffle: bool = True) -> BatchReader:
    """The resumable training reader of pairs (`ft.data.BatchReader` with a `PairPlanner`)."""
    planner = PairPlanner(pairs, max_seq_len=max_seq_len, max_num_tokens=max_num_tokens, packing=packing,
                          pad_id=pad_id)
    return BatchReader(pairs, max_seq_len=max_seq_len, max_num_tokens=max_num_tokens, seed=seed, shuffle=shuffle,
                       max_num_data_epochs=max_num_data_epochs, dp_size=dp_size, dp_rank=dp_rank,
                       gradient_accumulation=gradient_accumulation, planner=planner)


def iter_pair_batches(pairs: Sequence[PreferencePair], *, max_seq_len: int, max_num_tokens: int, packing: bool,
                      dp_size: int, dp_rank: int, pad_id: int) -> Iterator[PreferenceBatch]:
    """One ordered pass (validation, the reference pass): rank r takes micro-batches r, r + dp, ...;
    ranks that run out first get empty batches, so every rank yields the same count."""
    planner = PairPlanner(pairs, max_seq_len=max_seq_len, max_num_tokens=max_num_tokens, packing=packing,
                          pad_id=pad_id)
    plans = planner.plan(range(len(pairs)))
    for start in range(0, len(plans), dp_size):
        i = start + dp_rank
        yield planner.collate(plans[i] if i < len(plans) else [])
