"""Packing and collation: positions, document ids, shifted labels, padding, coverage."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from ft.data import IGNORE_INDEX, BatchReader, Example, collate, labels_of, pack_rows
from ft.errors import ConfigError


def make_examples(n: int, *, max_len: int, seed: int = 0) -> list[Example]:
    """Examples with a prompt then a target; token values encode (example, position) so each is unique."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        length = rng.randint(2, max_len)
        prompt = rng.randint(1, length - 1)
        tokens = [1000 * i + t for t in range(length)]
        examples.append(Example(tokens, [False] * prompt + [True] * (length - prompt)))
    return examples


def split_documents(batch):
    """[(tokens, labels, positions)] of each document in a batch, from document ids."""
    docs = []
    for b in range(batch.tokens_BT.shape[0]):
        ids = batch.document_ids_BT[b]
        for d in ids.unique().tolist():
            if d == -1:
                continue
            sel = ids == d
            docs.append(tuple(t[b][sel].tolist() for t in (batch.tokens_BT, batch.labels_BT, batch.positions_BT)))
    return docs


def test_labels_are_shifted_within_a_document():
    ex = Example([10, 11, 12, 13, 14], [False, False, True, True, True])
    # label at t is token t+1 when t+1 is a target: 10->-100 (11 is prompt), 11->12, 12->13, 13->14, 14 (last)->-100
    assert labels_of(ex) == [-100, 12, 13, 14, -100]


def test_packed_batch_layout():
    a = Example([5, 6, 7], [False, True, True])
    b = Example([8, 9], [False, True])
    c = Example([3, 4, 5, 6], [False, False, True, True])
    batch = collate([a, b, c], [[0, 1], [2]], seq_len=6, num_rows=3, pad_id=0)
    assert batch.tokens_BT.tolist() == [[5, 6, 7, 8, 9, 0], [3, 4, 5, 6, 0, 0], [0] * 6]
    assert batch.positions_BT.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0], [0] * 6]
    assert batch.document_ids_BT.tolist() == [[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, -1, -1], [-1] * 6]
    assert batch.labels_BT.tolist() == [[6, 7, -100, 9, -100, -100], [-100, 5, 6, -100, -100, -100], [-100] * 6]
    assert (batch.num_target_tokens, batch.num_tokens, batch.num_examples) == (5, 9, 3)
    tensors = (batch.tokens_BT, batch.labels_BT, batch.positions_BT, batch.document_ids_BT)
    assert all(t.dtype == torch.int64 for t in tensors)


def test_pack_rows_fills_rows_and_keeps_every_example_once():
    rng = random.Random(1)
    lengths = [rng.randint(2, 300) for _ in range(2000)]
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows = pack_rows(lengths, order, max_seq_len=1024)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 1024 for row in rows)
    fill = sum(lengths) / (len(rows) * 1024)
    assert fill > 0.95, f"packing wastes too much: rows {fill:.1%} full"
    assert rows == pack_rows(lengths, order, max_seq_len=1024)  # deterministic


@pytest.mark.parametrize("packing", [True, False])
def test_one_epoch_holds_every_target_token_exactly_once(packing):
    examples = make_examples(300, max_len=60, seed=3)
    reader = BatchReader(
        examples, max_seq_len=64, max_num_tokens=256, seed=5, packing=packing, max_num_data_epochs=1
    )
    seen = []
    total_targets = 0
    for batch in reader:
        B, T = batch.tokens_BT.shape
        assert B * T <= 256 and T <= 64
        if packing:
            assert (B, T) == (4, 64)
        pad = batch.document_ids_BT == -1
        assert (batch.labels_BT[pad] == IGNORE_INDEX).all() and (batch.positions_BT[pad] == 0).all()
        assert batch.num_tokens == int((~pad).sum())
        assert batch.num_target_tokens == int((batch.labels_BT != IGNORE_INDEX).sum())
        total_targets += batch.num_target_tokens
        docs = split_documents(batch)
        assert len(docs) == batch.num_examples
        if not packing:
            assert all(len(set(batch.document_ids_BT[b].tolist()) - {-1}) == 1 for b in range(B))
        for tokens, labels, positions in docs:
            assert positions == list(range(len(tokens)))  # restart at 0, contiguous
            i = tokens[0] // 1000
            assert tokens == examples[i].tokens and labels == labels_of(examples[i])
            seen.append(i)
    assert Counter(seen) == Counter(range(len(examples)))
    assert total_targets == sum(e.num_target_tokens for e in examples)


def test_prompt_tokens_and_document_ends_get_no_label():
    examples = make_examples(50, max_len=30, seed=4)
    reader = BatchReader(examples, max_seq_len=32, max_num_tokens=64, seed=0, max_num_data_epochs=1)
    for batch in reader:
        for tokens, labels, _ in split_documents(batch):
            ex = examples[tokens[0] // 1000]
            assert labels[-1] == IGNORE_INDEX
            for t in range(len(tokens) - 1):
                want = tokens[t + 1] if ex.target_mask[t + 1] else IGNORE_INDEX
                assert labels[t] == want


def test_max_num_tokens_must_hold_a_row():
    with pytest.raises(ConfigError, match=r"max_num_tokens \(100\) must be at least max_seq_len \(128\)"):
        BatchReader(make_examples(4, max_len=10), max_seq_len=128, max_num_tokens=100)


def test_too_long_example_is_rejected_by_the_reader():
    with pytest.raises(ValueError, match="more than max_seq_len=8"):
        BatchReader([Example(list(range(9)), [True] * 9)], max_seq_len=8, max_num_tokens=16)
