"""Finding a run's `checkpoints` directory from what a user is likely to type.

fairseq2 writes `OUT/checkpoints`; ft, unless `--no-sweep-dir`, writes
`OUT/ft_<hash>/checkpoints`. So `resume_checkpoint_dir` / `checkpoint_dir` may
name the run directory, OUT, or `OUT/checkpoints` that does not exist: when
exactly one run below holds checkpoints it is used (and logged); when several
do, the error names them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ft.errors import CheckpointError

log = logging.getLogger("ft")


def find_checkpoint_dir(path: Path) -> Path:
    """The `checkpoints` directory `path` means (see the module docstring)."""
    if _has_steps(path):
        return path
    if _has_steps(path / "checkpoints"):
        return _found(path, path / "checkpoints")
    out = path.parent if path.name == "checkpoints" and not path.exists() else path
    if not out.is_dir():
        return path
    candidates = sorted(run / "checkpoints" for run in out.iterdir() if run.is_dir() and _has_steps(run / "checkpoints"))
    if len(candidates) == 1:
        return _found(path, candidates[0])
    if len(candidates) > 1:
        listed = ", ".join(str(c) for c in candidates)
        raise CheckpointError(f"{path} holds no checkpoint itself, and several runs below {out} do: {listed}; "
                              "pass one of them")
    return path


def _found(asked: Path, found: Path) -> Path:
    log.info("checkpoints: %s holds none itself; using %s, the one run below it", asked, found)
    return found


def _has_steps(directory: Path) -> bool:
    from ft.training.checkpoint import list_step_dirs

    return bool(list_step_dirs(directory))


__all__ = ["find_checkpoint_dir"]
