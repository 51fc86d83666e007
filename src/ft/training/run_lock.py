"""One run per output directory: an exclusive flock on OUT/.ft-run.lock.

The lock is the kernel's (flock), so it is released when the process ends, however
it ends: a crash leaves no stale lock to clean up. The file holds the pid, host
and start time of the holder only so that a second run can say who holds it.
Take it on the main process before anything writes into OUT; the other ranks of
the same run work under it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from ft.errors import OutputDirError, RunLockedError

LOCK_NAME = ".ft-run.lock"


class RunLock:
    """A held lock on an output directory; `release()` (or leaving the `with`) gives it back."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def output_dir_error(output_dir: Path, error: OSError, doing: str) -> OutputDirError:
    """One line for an OS error on the output directory."""
    if error.errno in (errno.ENOTDIR, errno.EEXIST) and not output_dir.is_dir():
        blocker = next((p for p in [output_dir, *output_dir.parents] if p.exists() and not p.is_dir()), output_dir)
        return OutputDirError(f"cannot use output directory {output_dir}: {blocker} is a file, not a directory")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputDirError(f"cannot {doing} in {output_dir}: {os.strerror(error.errno)}; choose a writable output directory")
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputDirError(f"cannot {doing} in {output_dir}: no space left on the device; free space or choose another output directory")
    return OutputDirError(f"cannot {doing} in {output_dir}: {error.strerror or error}")


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"pid {info['pid']} on host {info['host']}, started {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that did not record itself"


def lock_output_dir(output_dir: Path) -> RunLock:
    """Create `output_dir` if needed and lock it for this process, or say who holds it."""
    path = output_dir / LOCK_NAME
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise output_dir_error(output_dir, error, "take the run lock") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunLockedError(
            f"{output_dir} is in use by another ft run ({_holder(path)}); "
            "wait for it to end, stop it, or use another output directory"
        ) from None
    except OSError as error:
        os.close(fd)
        raise output_dir_error(output_dir, error, "take the run lock") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv[:8]}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    except OSError as error:
        os.close(fd)
        raise output_dir_error(output_dir, error, "write the run lock") from None
    return RunLock(path, fd)
