"""The directory `ft lm merge_lora OUT` writes: whole or not at all, and replacing only a
merge ft wrote.

The merge is written into `OUT.tmp/` (holding `ft-incomplete.json` from its first
moment, and locked while a merge writes it), sealed with `ft-manifest.json` (every
file with its size and sha256, as a checkpoint step is) and renamed to OUT.
`ft-merge.json`, listed in the manifest, says what was merged. A non-empty OUT is
replaced only when it is such a directory and every file in it is still the one ft
wrote; anything else is the user's, and ft stops before it writes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from ft.errors import OutputDirError
from ft.training.manifest import (
    MANIFEST_NAME, ManifestError, fsync_dir, has_incomplete_marker, read_manifest, remove_listed, seal, verify,
    write_atomic, write_incomplete_marker,
)
from ft.training.run_lock import output_dir_error

log = logging.getLogger("ft")

MERGE_RECORD = "ft-merge.json"
MERGE_FORMAT = "ft-lora-merge"
TMP_SUFFIX = ".tmp"
REPLACED_SUFFIX = ".replaced"


def check_output_dir(out: Path) -> None:
    """OutputDirError unless `out` is absent, an empty directory, or a merge ft wrote that
    nobody has changed since (every file hashed against its manifest)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputDirError(f"output path {out} exists and is not a directory; choose a new or empty directory")
    if out.is_dir() and any(out.iterdir()):
        problem = _why_not_a_merge(out, hash_files=True)
        if problem is not None:
            raise OutputDirError(f"output directory {out} is not empty and {problem}; ft replaces only a merge it "
                                 "wrote and nobody changed: choose a new or empty directory, or move this one away")


def write_merged_dir(out: Path, write: Callable[[Path], None], record: dict[str, Any]) -> None:
    """Run `write(directory)` on a fresh `OUT.tmp`, add `ft-merge.json` (`record`) and the
    manifest, then put it in place of `out` (see `check_output_dir`). On any failure
    the temporary directory is removed and `out` is as it was."""
    tmp = out.with_name(out.name + TMP_SUFFIX)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with _fresh_locked_dir(tmp, out):
            try:
                write(tmp)
                write_atomic(tmp / MERGE_RECORD, json.dumps({"format": MERGE_FORMAT, "version": 1, **record},
                                                            indent=1) + "\n")
                seal(tmp, step=0)  # a merge is no training step; the manifest is the proof of what ft wrote
                _publish(tmp, out)
            except BaseException:
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp, ignore_errors=True)  # ours: made and locked above
                raise
    except OSError as error:
        raise output_dir_error(out, error, "write the merged model") from None


@contextlib.contextmanager
def _fresh_locked_dir(tmp: Path, out: Path) -> Iterator[None]:
    """Create `tmp` (removing ft's leftover of an interrupted merge), marked and locked."""
    if tmp.exists() or tmp.is_symlink():
        ours = tmp.is_dir() and not tmp.is_symlink() and (
            has_incomplete_marker(tmp) or _why_not_a_merge(tmp, hash_files=False) is None)
        if not ours:
            raise OutputDirError(f"{tmp} exists and ft did not leave it there; move it away to merge into {out}")
        with _locked(tmp, out):
            log.warning("removing %s, left by an interrupted merge", tmp)
            shutil.rmtree(tmp)
    try:
        tmp.mkdir()
    except FileExistsError:
        raise OutputDirError(f"another merge into {out} has just started (it made {tmp})") from None
    write_incomplete_marker(tmp, 0)
    with _locked(tmp, out):
        yield


@contextlib.contextmanager
def _locked(directory: Path, out: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputDirError(f"another merge into {out} is running (it is writing {directory})") from None
            raise
        yield
    finally:
        os.close(fd)


def _publish(tmp: Path, out: Path) -> None:
    replaced = out.with_name(out.name + REPLACED_SUFFIX)
    if replaced.exists() or replaced.is_symlink():  # left by a replace that was interrupted
        _remove_merge(replaced)
    if out.is_dir() and not out.is_symlink() and any(out.iterdir()):
        problem = _why_not_a_merge(out, hash_files=False)  # hashed in check_output_dir; re-check what is cheap
        if problem is not None:
            raise OutputDirError(f"output directory {out} changed during the merge: {problem}; nothing was replaced")
        out.rename(replaced)
        try:
            tmp.rename(out)
        except BaseException:
            replaced.rename(out)  # the earlier merge stays the one in place
            raise
        fsync_dir(out.parent)
        _remove_merge(replaced)
    else:
        tmp.rename(out)  # also replaces an empty directory
        fsync_dir(out.parent)


def _remove_merge(directory: Path) -> None:
    problem = _why_not_a_merge(directory, hash_files=False)
    if problem is not None:
        raise OutputDirError(f"{directory} exists and {problem}; move it away and re-run")
    manifest = read_manifest(directory)
    kept = remove_listed(directory, manifest.files)
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        log.warning("left %s in place: it holds files ft did not write (%s)", directory, ", ".join(kept) or "?")


def _why_not_a_merge(directory: Path, *, hash_files: bool) -> str | None:
    """Why ft cannot prove it wrote `directory` as a merge, or None when it can."""
    try:
        manifest = read_manifest(directory)
    except ManifestError as error:
        return f"its {error}"
    if manifest is None or MERGE_RECORD not in manifest.files:
        return f"ft did not write a merge there (it holds no {MERGE_RECORD})"
    unlisted = _entries(directory) - set(manifest.files) - {MANIFEST_NAME}
    if unlisted:
        return f"it holds {sorted(unlisted)[0]}, which ft did not write"
    if hash_files:
        problems = verify(directory, manifest.files)
        if problems:
            return f"{problems[0]} (ft wrote a merge there, but it has been changed)"
    return None


def _entries(directory: Path) -> set[str]:
    """Every file and symlink under `directory` (relative POSIX paths), not following symlinks."""
    found = set()
    for parent, dirs, names in os.walk(directory, followlinks=False):
        for name in [*names, *(d for d in dirs if (Path(parent) / d).is_symlink())]:
            found.add((Path(parent) / name).relative_to(directory).as_posix())
    return found


__all__ = ["MERGE_RECORD", "check_output_dir", "write_merged_dir"]
