"""Finding a run's `checkpoints` directory from what a user is likely to type.

fairseq2 writes `OUT/checkpoints`; ft, unless `--no-sweep-dir`, writes
`OUT/ft_<hash>/checkpoints`. So `resume_checkpoint_dir` / `checkpoint_dir` may
name the run directory, OUT, or `OUT/checkpoints` that does not exist: when
exactly one run below holds checkpoints it is used (and logged); when several
do, the error names them.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ft.errors import CheckpointError

STEP_DIR = re.compile(r"^step_(\d+)$")


def list_step_dirs(checkpoint_dir: Path) -> dict[int, Path]:
    """Complete step directories by step (a `.tmp` one is never complete)."""
    if not checkpoint_dir.is_dir():
        return {}
    steps = {}
    for path in checkpoint_dir.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir():
            steps[int(match.group(1))] = path
    return dict(sorted(steps.items()))

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
    return bool(list_step_dirs(directory))


__all__ = ["find_checkpoint_dir"]
