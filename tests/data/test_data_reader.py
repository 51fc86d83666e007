"""The batch reader: seeded shuffling, epochs, dp/accumulation split, resumable state, validation."""

from __future__ import annotations

import json

import pytest
import torch

from ft.data import BatchReader, Example, iter_validation_batches
from ft.errors import DataError


def make_examples(n: int = 120) -> list[Example]:
    examples = []
    for i in range(n):
        length = 3 + (i * 7) % 29
        examples.append(Example([1000 * i + t for t in range(length)], [False, False] + [True] * (length - 2)))
    return examples


EXAMPLES = make_examples()


def reader(**kw) -> BatchReader:
    args = dict(max_seq_len=32, max_num_tokens=64, seed=0, max_num_data_epochs=3)
    args.update(kw)
    return BatchReader(EXAMPLES, **args)


def key(batch):
    """A batch as comparable plain data."""
    return (
        batch.tokens_BT.tolist(),
        batch.labels_BT.tolist(),
        batch.positions_BT.tolist(),
        batch.document_ids_BT.tolist(),
        batch.num_target_tokens,
        batch.num_tokens,
        batch.num_examples,
    )


def stream(r: BatchReader, limit: int | None = None) -> list:
    out = []
    while limit is None or len(out) < limit:
        batch = r.next_micro_batch()
        if batch is None:
            break
        out.append(key(batch))
    return out


def first_docs(batch_key) -> list[int]:
    return [row[0] // 1000 for row in batch_key[0] if batch_key[6]]


def test_deterministic_given_the_seed_and_different_across_seeds():
    assert stream(reader(seed=1)) == stream(reader(seed=1))
    assert stream(reader(seed=1), 5) != stream(reader(seed=2), 5)


def test_epochs_reshuffle_and_end():
    r = reader(max_num_data_epochs=2)
    per_epoch = [len(r._plan(0)), len(r._plan(1))]
    assert r.epoch_order(0) != r.epoch_order(1)
    batches = stream(r)
    assert len(batches) == sum(per_epoch)
    assert r.next_micro_batch() is None and r.next_step_batches() is None  # stays exhausted
    epoch0_tokens = sorted(t for b in batches[: per_epoch[0]] for row in b[0] for t in row if t)
    epoch1_tokens = sorted(t for b in batches[per_epoch[0] :] for row in b[0] for t in row if t)
    assert epoch0_tokens == epoch1_tokens  # each epoch is the whole dataset once
    assert r.epoch == 1


def test_unlimited_epochs_keep_going():
    r = reader(max_num_data_epochs=None)
    n = sum(len(reader()._plan(e)) for e in range(5))  # packing, so the batch count varies by epoch
    assert len(stream(r, n)) == n and r.epoch == 4
    r.next_micro_batch()
    assert r.epoch == 5


@pytest.mark.parametrize("dp, ga", [(2, 1), (2, 2), (4, 1), (3, 1)])
def test_dp_ranks_get_exactly_what_one_process_accumulates(dp, ga):
    """dp=N ranks with ga=G see, step by step, the N*G micro-batches one process with ga=N*G sees."""
    single = reader(gradient_accumulation=dp * ga)
    ranks = [reader(dp_size=dp, dp_rank=r, gradient_accumulation=ga) for r in range(dp)]
    steps = 0
    while True:
        want = single.next_step_batches()
        got = [rank.next_step_batches() for rank in ranks]
        if want is None:
            assert all(g is None for g in got)  # all ranks stop at the same step
            break
        assert all(len(g) == ga for g in got)
        assert [key(b) for g in got for b in g] == [key(b) for b in want]
        steps += 1
    total = sum(len(single._plan(e)) for e in range(3))
    assert steps == -(-total // (dp * ga))  # the last step is filled out with empty batches


def test_last_step_is_padded_with_empty_batches():
    r = reader(max_num_data_epochs=1, gradient_accumulation=4)
    n = len(r._plan(0))
    steps = []
    while (batches := r.next_step_batches()) is not None:
        steps.append(batches)
    assert len(steps) == -(-n // 4)
    empties = [b for s in steps for b in s if b.is_empty]
    assert len(empties) == (-n) % 4
    for b in empties:
        assert b.tokens_BT.shape == (2, 32) and (b.labels_BT == -100).all() and b.num_target_tokens == 0


@pytest.mark.parametrize("k", [0, 3, 7])
def test_restore_mid_epoch_continues_exactly(k):
    full = stream(reader(seed=4))
    r = reader(seed=4)
    head = stream(r, k)
    state = json.loads(json.dumps(r.state_dict()))  # JSON-serialisable
    assert all(isinstance(v, int) for v in state.values())
    restored = reader(seed=4)
    restored.load_state_dict(state)
    assert head + stream(restored) == full


def test_restore_across_an_epoch_boundary():
    full = stream(reader(seed=9))
    n0 = len(reader(seed=9)._plan(0))
    for k in (n0 - 1, n0, n0 + 1, len(full)):
        r = reader(seed=9)
        head = stream(r, k)
        restored = reader(seed=9)
        restored.load_state_dict(r.state_dict())
        assert head + stream(restored) == full, k
    assert restored.next_micro_batch() is None


def test_restore_mid_step_and_across_layouts():
    full_steps = []
    one = reader(gradient_accumulation=2)
    while (s := one.next_step_batches()) is not None:
        full_steps.append([key(b) for b in s])

    # Saved in the middle of a step, restored with the same layout.
    r = reader(gradient_accumulation=2)
    r.next_step_batches()
    r.next_micro_batch()
    restored = reader(gradient_accumulation=2)
    restored.load_state_dict(r.state_dict())
    assert key(restored.next_micro_batch()) == full_steps[1][1]

    # Saved by rank 0 of dp=2 at a step boundary, resumed by one process with ga=2.
    ranks = [reader(dp_size=2, dp_rank=i) for i in range(2)]
    for _ in range(5):
        for rank in ranks:
            rank.next_step_batches()
    assert ranks[0].state_dict() == ranks[1].state_dict()
    single = reader(gradient_accumulation=2)
    single.load_state_dict(ranks[0].state_dict())
    rest = []
    while (s := single.next_step_batches()) is not None:
        rest.append([key(b) for b in s])
    assert rest == full_steps[5:]

    with pytest.raises(DataError, match="mid-step"):
        reader(gradient_accumulation=3).load_state_dict(r.state_dict())


def test_state_from_another_dataset_or_seed_is_refused():
    state = reader(seed=1).state_dict()
    with pytest.raises(DataError, match="dataset of 120 examples, but this one has 7"):
        BatchReader(make_examples(7), max_seq_len=32, max_num_tokens=64, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="seed 1, this run has 2"):
        reader(seed=2).load_state_dict(state)


def test_validation_reads_the_split_once_unshuffled():
    batches = list(iter_validation_batches(EXAMPLES, max_seq_len=32, max_num_tokens=64))
    # the first token of each document (position 0, not padding) identifies its example
    starts = [b.tokens_BT[(b.positions_BT == 0) & (b.document_ids_BT >= 0)] for b in batches]
    docs = [t // 1000 for s in starts for t in s.tolist()]
    assert sum(b.num_examples for b in batches) == len(EXAMPLES)
    assert sum(b.num_target_tokens for b in batches) == sum(e.num_target_tokens for e in EXAMPLES)
    assert sorted(docs) == list(range(len(EXAMPLES)))  # each example once
    row_starts = [t // 1000 for b in batches for t in b.tokens_BT[:, 0][b.document_ids_BT[:, 0] >= 0].tolist()]
    assert row_starts[0] == 0 and row_starts == sorted(row_starts)  # not shuffled: rows follow the file
    again = iter_validation_batches(EXAMPLES, max_seq_len=32, max_num_tokens=64)
    assert [key(b) for b in batches] == [key(b) for b in again]

    per_rank = [
        list(iter_validation_batches(EXAMPLES, max_seq_len=32, max_num_tokens=64, dp_size=3, dp_rank=r))
        for r in range(3)
    ]
    assert len({len(p) for p in per_rank}) == 1  # same count on every rank
    interleaved = [key(per_rank[i % 3][i // 3]) for i in range(len(batches))]
    assert interleaved == [key(b) for b in batches]
    assert all(b.is_empty for p in per_rank for b in p[len(batches) // 3 + 1 :])


def test_unpacked_mode_pads_to_the_longest_row():
    r = reader(packing=False, max_num_tokens=96, max_num_data_epochs=1)
    for batch in r:
        B, T = batch.tokens_BT.shape
        assert B * T <= 96
        lengths = (batch.document_ids_BT != -1).sum(dim=1)
        assert int(lengths.max()) == T and batch.num_examples == B
        assert torch.equal(batch.document_ids_BT.clamp(max=0), torch.where(batch.document_ids_BT == -1, -1, 0))
