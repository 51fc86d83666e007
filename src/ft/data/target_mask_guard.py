"""A guard against a known silent failure of SFT: a target mask (the assistant-only
loss mask) that is empty everywhere, or that covers every token.

Both come from a chat template or row format that does not fit the data or the
tokenizer (a template that never finds the assistant turns; one that marks the
whole dialog); training then either has nothing to learn or learns to write the
prompts, and the loss curve looks normal either way. An empty mask is caught by
`read_examples` (examples without a target are dropped and counted; a split left
with none is an error). A full mask is caught here: the first examples of the
training split are looked at before any step, and the run stops with a message
that says what was found and where to look.
"""

from __future__ import annotations

from ft.data.dataset import ExampleSet
from ft.errors import DataError

SAMPLE = 64


def check_target_masks(examples: ExampleSet, *, sample: int = SAMPLE) -> None:
    """DataError when each of the first `sample` examples has every predictable token as a target."""
    where = examples.source.name + (f" split {examples.source.split!r}" if examples.source.split else "")
    first = examples[:sample]
    if all(len(e) > 1 and all(e.target_mask[1:]) for e in first):
        raise DataError(
            f"dataset {where}: the target mask covers every token of the first {len(first)} examples, prompts "
            "included, so the model would learn to write the prompts; check dataset_format (chat rows need "
            "user turns, prompt/response rows a non-empty prompt)"
        )


__all__ = ["check_target_masks"]
