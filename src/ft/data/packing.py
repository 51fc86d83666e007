"""Packing examples into rows, grouping rows into micro-batches, collating to tensors.

Packed mode: examples are placed into rows of `max_seq_len` tokens (first fit over
a small window of open rows, so little is wasted while the order stays close to
the shuffle); a micro-batch is `max_num_tokens // max_seq_len` rows, always the
full `[B, max_seq_len]` shape (a fixed shape suits torch.compile and CUDA graphs).
Unpacked mode: one example per row, rows padded to the micro-batch's longest, as
many rows as fit `max_num_tokens`; it exists to measure what packing buys.

In both, `positions_BT` restart at 0 for each document, `document_ids_BT` number the
documents of a row from 0 (padding: -1), and `labels_BT` are the next-token targets
already shifted within each document: `labels[t] = tokens[t+1]` when token t+1 is
a target token of the same document, else -100. So the trainer computes plain
`cross_entropy(logits_BTV, labels_BT, ignore_index=-100)` and no loss ever crosses
a document boundary or lands on a prompt token or on padding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ft.data.formats import Example

IGNORE_INDEX = -100
PAD_DOCUMENT_ID = -1
_OPEN_ROWS = 16  # rows kept open for first-fit; more barely helps and costs time

Rows = list[list[int]]  # rows of example indices; a micro-batch is one `Rows`


@dataclass(frozen=True)
class Batch:
    """One micro-batch. All tensors are int64 `[B, T]`."""

    tokens_BT: torch.Tensor
    labels_BT: torch.Tensor  # next-token targets, -100 where no loss
    positions_BT: torch.Tensor  # per-document positions; 0 on padding
    document_ids_BT: torch.Tensor  # document of each token within its row; -1 on padding
    num_target_tokens: int  # labels != -100
    num_tokens: int  # non-padding tokens
    num_examples: int  # documents in the batch

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return replace(
            self,
            tokens_BT=self.tokens_BT.to(device, non_blocking=non_blocking),
            labels_BT=self.labels_BT.to(device, non_blocking=non_blocking),
            positions_BT=self.positions_BT.to(device, non_blocking=non_blocking),
            document_ids_BT=self.document_ids_BT.to(device, non_blocking=non_blocking),
        )

    @property
    def is_empty(self) -> bool:
        """All padding: fills out the last optimizer step of the data so ranks stay in step."""
        return self.num_examples == 0


def labels_of(example: Example) -> list[int]:
    """Next-token labels of one document: token t+1 where it is a target, else -100."""
    tokens, mask = example.tokens, example.target_mask
    labels = [tok if m else IGNORE_INDEX for tok, m in zip(tokens[1:], mask[1:])]
    labels.append(IGNORE_INDEX)
    return labels


def pack_rows(lengths: Sequence[int], order: Sequence[int], max_seq_len: int) -> Rows:
    """Place examples (visited in `order`) into rows of at most `max_seq_len` tokens.

    First fit over the most recent open rows: a row stops taking examples when it
    is full or when too many newer rows are open. Rows come out in the order they
    were started, so row k begins with an earlier example than row k+1.
    Deterministic for a given order.
    """
    rows: Rows = []
    free: list[int] = []  # free tokens of each row
    open_rows: list[int] = []  # indices of rows still taking examples, oldest first
    for i in order:
        n = lengths[i]
        if n > max_seq_len:
            raise ValueError(f"example {i} has {n} tokens, more than max_seq_len={max_seq_len}")
        for k, r in enumerate(open_rows):
            if n <= free[r]:
                rows[r].append(i)
                free[r] -= n
                if free[r] == 0:
                    del open_rows[k]
                break
        else:
            rows.append([i])
            free.append(max_seq_len - n)
            if n < max_seq_len:
                open_rows.append(len(rows) - 1)
                if len(open_rows) > _OPEN_ROWS:
                    open_rows.pop(0)
    return rows


def plan_packed(lengths: Sequence[int], order: Sequence[int], *, max_seq_len: int, batch_size: int) -> list[Rows]:
    """Micro-batches of `batch_size` packed rows (the last one may have fewer)."""
    rows = pack_rows(lengths, order, max_seq_len)
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def plan_unpacked(lengths: Sequence[int], order: Sequence[int], *, max_num_tokens: int) -> list[Rows]:
    """Micro-batches of single-example rows, as many as fit `rows * longest <= max_num_tokens`."""
    batches: list[Rows] = []
    current: Rows = []
    longest = 0
    for i in order:
        n = lengths[i]
        if n > max_num_tokens:
            raise ValueError(f"example {i} has {n} tokens, more than max_num_tokens={max_num_tokens}")
        if current and (len(current) + 1) * max(longest, n) > max_num_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append([i])
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def collate(
    examples: Sequence[Example],
    rows: Rows,
    *,
    seq_len: int | None,
    num_rows: int | None = None,
    pad_id: int = 0,
) -> Batch:
    """Build the tensors of one micro-batch.

    `seq_len` is the row length (None: the longest row); `num_rows` pads the batch
    with empty rows up to that many (packed mode keeps a fixed `[B, T]`).
    """
    lengths = [sum(len(examples[i]) for i in row) for row in rows]
    T = seq_len if seq_len is not None else max(lengths, default=1)
    B = max(num_rows or 0, len(rows))
    tokens: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    doc_ids: list[int] = []
    num_target_tokens = 0
    num_examples = 0
    for row, length in zip(rows, lengths):
        if length > T:
            raise ValueError(f"a row of {length} tokens does not fit seq_len={T}")
        for doc, i in enumerate(row):
            example = examples[i]
            n = len(example)
            tokens.extend(example.tokens)
            row_labels = labels_of(example)
            labels.extend(row_labels)
            positions.extend(range(n))
            doc_ids.extend([doc] * n)
            num_target_tokens += n - row_labels.count(IGNORE_INDEX)
            num_examples += 1
        pad = T - length
        tokens.extend([pad_id] * pad)
        labels.extend([IGNORE_INDEX] * pad)
        positions.extend([0] * pad)
        doc_ids.extend([PAD_DOCUMENT_ID] * pad)
    num_pad_rows = B - len(rows)
    tokens.extend([pad_id] * (num_pad_rows * T))
    labels.extend([IGNORE_INDEX] * (num_pad_rows * T))
    positions.extend([0] * (num_pad_rows * T))
    doc_ids.extend([PAD_DOCUMENT_ID] * (num_pad_rows * T))

    def as_BT(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).view(B, T)

    return Batch(
        tokens_BT=as_BT(tokens),
        labels_BT=as_BT(labels),
        positions_BT=as_BT(positions),
        document_ids_BT=as_BT(doc_ids),
        num_target_tokens=num_target_tokens,
        num_tokens=sum(lengths),
        num_examples=num_examples,
    )
