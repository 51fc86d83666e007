"""The training batch reader: shuffled epochs, one global micro-batch stream, resumable.

Each epoch shuffles the examples with `random.Random` seeded by (seed, epoch) and
packs them into micro-batches (`ft.data.packing`); micro-batches never span two
epochs, so an epoch shows every target token of every example exactly once.
Epochs follow one another into a single global stream of micro-batches.

An optimizer step takes `dp_size * gradient_accumulation` consecutive micro-batches
of that stream, and data-parallel rank r takes the r-th run of
`gradient_accumulation` of them. So dp=N hands its N ranks exactly the micro-batches
one process with `gradient_accumulation=N` accumulates, and `max_num_tokens` is per
rank (fairseq2's convention). Tensor-parallel ranks of one dp group pass the same
`dp_rank` and so read the same batches. Every rank computes the same plan (cheap:
packing is list work) and collates only its own micro-batches.

With `max_num_data_epochs` set, the data ends after that many epochs. If the last
optimizer step is only partly covered, its missing micro-batches are empty
(all-padding) batches, so every rank runs the same number of steps without talking
to the others; after that `next_micro_batch()` returns None.

`state_dict()` is a few plain ints (JSON-serialisable) that do not depend on the
layout: the global micro-batch where the current step starts. A state saved at a
step boundary therefore loads under any dp_size / gradient_accumulation whose step
size divides it, e.g. dp=2 -> 1 process with gradient_accumulation=2.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

from ft.data.formats import Example
from ft.data.packing import Batch, Rows, collate, plan_packed, plan_unpacked
from ft.errors import ConfigError, DataError

_STATE_VERSION = 1


def micro_batch_size(*, max_seq_len: int, max_num_tokens: int) -> int:
    """Rows per packed micro-batch; `max_num_tokens` must hold at least one full row."""
    if max_seq_len < 2:
        raise ConfigError(f"max_seq_len must be at least 2, got {max_seq_len}")
    if max_num_tokens < max_seq_len:
        raise ConfigError(
            f"max_num_tokens ({max_num_tokens}) must be at least max_seq_len ({max_seq_len}): "
            "a micro-batch holds max_num_tokens // max_seq_len rows of max_seq_len tokens"
        )
    return max_num_tokens // max_seq_len


class _Planner:
    """Micro-batch plans (rows of example indices) of examples in a given order."""

    def __init__(
        self, examples: Sequence[Example], *, max_seq_len: int, max_num_tokens: int, packing: bool, pad_id: int
    ) -> None:
        if not examples:
            raise DataError("no examples to read")
        self.examples = examples
        self.lengths = [len(e) for e in examples]
        longest = max(self.lengths)
        if longest > max_seq_len:
            raise ValueError(
                f"an example has {longest} tokens, more than max_seq_len={max_seq_len}; "
                "read_examples(max_seq_len=...) drops or truncates such examples"
            )
        self.max_seq_len = max_seq_len
        self.max_num_tokens = max_num_tokens
        self.batch_size = micro_batch_size(max_seq_len=max_seq_len, max_num_tokens=max_num_tokens)
        self.packing = packing
        self.pad_id = pad_id

    def plan(self, order: Sequence[int]) -> list[Rows]:
        if self.packing:
            return plan_packed(self.lengths, order, max_seq_len=self.max_seq_len, batch_size=self.batch_size)
        return plan_unpacked(self.lengths, order, max_num_tokens=self.max_num_tokens)

    def collate(self, rows: Rows) -> Batch:
        if self.packing:
            return collate(
                self.examples, rows, seq_len=self.max_seq_len, num_rows=self.batch_size, pad_id=self.pad_id
            )
        if not rows:  # an empty unpacked batch: one padding token, so shapes stay non-degenerate
            return collate(self.examples, rows, seq_len=1, num_rows=1, pad_id=self.pad_id)
        return collate(self.examples, rows, seq_len=None, pad_id=self.pad_id)


class BatchReader:
    """Training micro-batches for one data-parallel rank; see the module docstring."""

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        max_seq_len: int,
        max_num_tokens: int,
        seed: int = 0,
        shuffle: bool = True,
        packing: bool = True,
        max_num_data_epochs: int | None = None,
        dp_size: int = 1,
        dp_rank: int = 0,
        gradient_accumulation: int = 1,
        pad_id: int = 0,
        planner: Any | None = None,
    ) -> None:
        """`planner`: micro-batches of other items than `examples` (preference pairs):
        `.examples`, `.plan(order) -> list of plans`, `.collate(plan or []) -> batch`."""
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if gradient_accumulation < 1:
            raise ConfigError(f"gradient_accumulation must be at least 1, got {gradient_accumulation}")
        if max_num_data_epochs is not None and max_num_data_epochs < 1:
            raise ConfigError(f"max_num_data_epochs must be at least 1 (or unset), got {max_num_data_epochs}")
        self._planner = planner or _Planner(
            examples, max_seq_len=max_seq_len, max_num_tokens=max_num_tokens, packing=packing, pad_id=pad_id
        )
        self.seed = seed
        self.shuffle = shuffle
        self.max_num_data_epochs = max_num_data_epochs
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        self.gradient_accumulation = gradient_accumulation
        self._plans: dict[int, list[Rows]] = {}
        # Position: the step starts at global micro-batch `_step_start`, which lies
        # in epoch `_step_epoch` whose first micro-batch is `_step_epoch_start`.
        self._step_start = 0
        self._step_epoch = 0
        self._step_epoch_start = 0
        self._in_step = 0  # micro-batches of the current step this rank has read
        self._exhausted = False
        self.epoch = 0  # epoch of the last micro-batch read (0-based)

    @property
    def micro_batches_per_step(self) -> int:
        """Global micro-batches per optimizer step: dp_size * gradient_accumulation."""
        return self.dp_size * self.gradient_accumulation

    def epoch_order(self, epoch: int) -> list[int]:
        """Example indices in the order epoch `epoch` visits them."""
        order = list(range(len(self._planner.examples)))
        if self.shuffle:
            random.Random(f"ft.data:{self.seed}:{epoch}").shuffle(order)
        return order

    def _plan(self, epoch: int) -> list[Rows]:
        if epoch not in self._plans:
            # Two epochs at most are live: the step's start and a rank's batch past a boundary.
            for old in [e for e in self._plans if e < epoch - 1]:
                del self._plans[old]
            self._plans[epoch] = self._planner.plan(self.epoch_order(epoch))
        return self._plans[epoch]

    def _locate(self, g: int, epoch: int, epoch_start: int) -> tuple[int, int] | None:
        """(epoch, epoch start) holding global micro-batch g, walking forward; None past the end."""
        while True:
            if self.max_num_data_epochs is not None and epoch >= self.max_num_data_epochs:
                return None
            n = len(self._plan(epoch))
            if g < epoch_start + n:
                return epoch, epoch_start
            epoch, epoch_start = epoch + 1, epoch_start + n

    def next_micro_batch(self) -> Batch | None:
        """This rank's next micro-batch, or None once the data is exhausted (at a step boundary)."""
        if self._exhausted:
            return None
        if self._in_step == 0:
            found = self._locate(self._step_start, self._step_epoch, self._step_epoch_start)
            if found is None:
                self._exhausted = True
                return None
            self._step_epoch, self._step_epoch_start = found
        g = self._step_start + self.dp_rank * self.gradient_accumulation + self._in_step
        found = self._locate(g, self._step_epoch, self._step_epoch_start)
        self._in_step += 1
        if self._in_step == self.gradient_accumulation:
            self._in_step = 0
            self._step_start += self.micro_batches_per_step
        if found is None:
            return self._planner.collate([])
        epoch, epoch_start = found
        self.epoch = epoch
        return self._planner.collate(self._plan(epoch)[g - epoch_start])

    def next_step_batches(self) -> list[Batch] | None:
        """This rank's `gradient_accumulation` micro-batches of the next optimizer step, or None."""
        if self._in_step != 0:
            raise RuntimeError("next_step_batches() called in the middle of a step")
        first = self.next_micro_batch()
        if first is None:
            return None
        return [first] + [self.next_micro_batch() for _ in range(self.gradient_accumulation - 1)]

    def __iter__(self) -> Iterator[Batch]:
        while (batch := self.next_micro_batch()) is not None:
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "num_examples": len(self._planner.examples),
            "global_micro_batch": self._step_start,
            "micro_batch_in_step": self._in_step,
            "micro_batches_per_step": self.micro_batches_per_step,
            "epoch": self._step_epoch,
            "epoch_start": self._step_epoch_start,
            "exhausted": int(self._exhausted),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the reader that saved `state` stopped."""
        if state.get("version") != _STATE_VERSION:
            raise DataError(f"data reader state has version {state.get('version')}, expected {_STATE_VERSION}")
        if state["num_examples"] != len(self._planner.examples):
            raise DataError(
                f"the data reader state was saved for a dataset of {state['num_examples']} examples, "
                f"but this one has {len(self._planner.examples)}; resume with the same dataset and "
                "max_seq_len, or start the data afresh"
            )
        if state["seed"] != self.seed:
            raise DataError(f"the data reader state was saved with seed {state['seed']}, this run has {self.seed}")
        g, in_step = int(state["global_micro_batch"]), int(state["micro_batch_in_step"])
        same_layout = state["micro_batches_per_step"] == self.micro_batches_per_step
        if (in_step and not same_layout) or g % self.micro_batches_per_step:
            raise DataError(
                f"the data reader state was saved mid-step (global micro-batch {g}, {in_step} into a step of "
                f"{state['micro_batches_per_step']}); it cannot continue with dp_size * gradient_accumulation = "
                f"{self.micro_batches_per_step}"
            )
        self._step_start, self._in_step = g, in_step
        self._step_epoch, self._step_epoch_start = int(state["epoch"]), int(state["epoch_start"])
        self._exhausted = bool(state.get("exhausted", 0))
        self.epoch = self._step_epoch
        self._plans.clear()


def iter_validation_batches(
    examples: Sequence[Example],
    *,
    max_seq_len: int,
    max_num_tokens: int,
    packing: bool = True,
    dp_size: int = 1,
    dp_rank: int = 0,
    pad_id: int = 0,
) -> Iterator[Batch]:
    """One pass over `examples`, unshuffled and deterministic, in the training batch format.

    Rank r takes micro-batches r, r + dp_size, ...; ranks that run out before the
    others get empty batches, so all ranks yield the same count and collectives
    stay matched.
    """
    planner = _Planner(
        examples, max_seq_len=max_seq_len, max_num_tokens=max_num_tokens, packing=packing, pad_id=pad_id
    )
    plan = planner.plan(range(len(examples)))
    for start in range(0, len(plan), dp_size):
        i = start + dp_rank
        yield planner.collate(plan[i] if i < len(plan) else [])
