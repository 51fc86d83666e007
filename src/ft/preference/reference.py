"""Reference log-probabilities, computed once before training and stored with the run.

DPO compares the policy with a reference model, usually the model training starts
from. Instead of a second model in memory (twice the weights; fairseq2 0.4 and TRL
by default keep one) the recipe runs one no-grad pass of the training model over
the whole train split before the first step, in the same sharded layout, and
stores each pair's (chosen, rejected) log-probabilities in
`OUT/reference/logprobs.safetensors` (8 bytes per pair). Training then reads
them by pair index. The cost is one forward pass over the data, about a third
of an epoch of training.

The pass is resumable: every `save_every` rounds of micro-batches (a round: one
micro-batch per dp rank) the ranks sum their new rows (each pair is computed by
one rank), and the main process rewrites the file atomically with the number of
rounds done. A stop (SIGTERM) between rounds saves and returns None; the next run
continues from the saved round. The file records a fingerprint of the pairs, the
starting weights and the layout-independent settings that change the numbers;
a stored table with another fingerprint is an error, never silently reused.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ft.errors import ConfigError
from ft.gang import Gangs
from ft.preference.data import PairPlanner, PairSet
from ft.preference.logprobs import batch_sequence_logprobs

log = logging.getLogger("ft")

REFERENCE_FILE = "logprobs.safetensors"


def reference_fingerprint(pairs: PairSet, **settings: Any) -> str:
    return json.dumps({"pairs": pairs.fingerprint(), **settings}, sort_keys=True)


def load_reference(directory: Path, fingerprint: str) -> tuple[torch.Tensor, int, bool] | None:
    """(table [pairs, 2], rounds done, complete) stored in `directory`, or None."""
    path = directory / REFERENCE_FILE
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"{path} holds reference log-probs of other data, weights or settings ({meta.get('fingerprint')}); "
            f"this run needs {fingerprint}. Use a new OUT, or delete {directory} to recompute them"
        )
    return load_file(str(path))["logprobs"], int(meta["rounds_done"]), meta["complete"] == "1"


def compute_reference(
    model: nn.Module,
    pairs: PairSet,
    *,
    directory: Path,
    fingerprint: str,
    gangs: Gangs,
    autocast,
    planner: PairPlanner,
    chunk_size: int,
    save_every: int = 50,
    stop: Callable[[], bool] | None = None,
) -> torch.Tensor | None:
    """Every pair's reference log-probs `[pairs, 2]` (float32, on the host); computed
    and stored, or continued, or read from `directory`. None when `stop()` said so
    (the rounds done are saved)."""
    stored = load_reference(directory, fingerprint)
    table = torch.zeros(len(pairs), 2, dtype=torch.float32)
    start = 0
    if stored is not None:
        table, start, complete = stored
        if complete:
            log.info("reference log-probs: read from %s", directory / REFERENCE_FILE)
            return table
        log.info("reference log-probs: continuing the pass at round %d", start)
    plans = planner.plan(range(len(pairs)))
    dp = gangs.dp.size
    num_rounds = math.ceil(len(plans) / dp)
    fresh = torch.zeros_like(table)  # rows of this rank since the last save
    was_training = model.training
    model.eval()
    try:
        for round_ in range(start, num_rounds):
            i = round_ * dp + gangs.dp.rank
            batch = planner.collate(plans[i] if i < len(plans) else [])
            with torch.no_grad(), autocast:
                logp_S, _ = batch_sequence_logprobs(model, batch, gangs.device, chunk_size=chunk_size)
            fresh.index_copy_(0, batch.pair_index_P, logp_S.view(-1, 2).float().cpu())
            done = round_ + 1
            if done % save_every == 0 or done == num_rounds:
                _sync(fresh, table, gangs)
                _save(directory, table, fingerprint, rounds_done=done, complete=done == num_rounds, gangs=gangs)
                if done < num_rounds and stop is not None and stop():
                    log.warning("reference pass stopped after round %d of %d; saved, re-run to continue",
                                done, num_rounds)
                    return None
    finally:
        model.train(was_training)
        _reshard(model)
    log.info("reference log-probs: %d pairs, stored in %s", len(pairs), directory / REFERENCE_FILE)
    return table


def _reshard(model: nn.Module) -> None:
    """FSDP2 leaves the root's parameters unsharded after a forward without backward;
    an optimizer built after this pass must see the sharded ones."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _sync(fresh: torch.Tensor, table: torch.Tensor, gangs: Gangs) -> None:
    """Add every rank's new rows into `table` (each pair was computed by one dp rank)."""
    summed = fresh.to(gangs.device)
    gangs.dp.all_reduce(summed)
    table += summed.cpu()
    fresh.zero_()


def _save(directory: Path, table: torch.Tensor, fingerprint: str, *, rounds_done: int, complete: bool,
          gangs: Gangs) -> None:
    if gangs.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (REFERENCE_FILE + ".tmp")
        save_file({"logprobs": table.contiguous()}, str(tmp), metadata={
            "fingerprint": fingerprint, "rounds_done": str(rounds_done), "complete": "1" if complete else "0",
        })
        os.replace(tmp, directory / REFERENCE_FILE)
    gangs.root.barrier()
