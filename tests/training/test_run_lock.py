"""One run per output directory: a second is refused by name, a crashed one leaves no stale lock."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ft.errors import OutputDirError, RunLockedError
from ft.training.run_lock import LOCK_NAME, lock_output_dir

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ft.training.run_lock import lock_output_dir
    lock = lock_output_dir(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(120)
""")


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock on tmp_path/out."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("learning_rate: 1e-5\n")
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    yield out, process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_second_run_is_refused_naming_the_first(holder):
    out, process = holder
    before = snapshot(out)
    with pytest.raises(RunLockedError) as caught:
        lock_output_dir(out)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"{out} is in use by another ft run (pid {process.pid} on host {socket.gethostname()}, started ")
    assert text.endswith("wait for it to end, stop it, or use another output directory")
    assert snapshot(out) == before


def test_lock_of_a_killed_run_is_free(holder):
    out, process = holder
    process.send_signal(signal.SIGKILL)  # a crash: no cleanup runs
    process.wait()
    with lock_output_dir(out) as lock:
        assert lock.held
        assert f'"pid": {os.getpid()}' in (out / LOCK_NAME).read_text()
    assert not lock.held


def test_release_lets_the_next_run_in(tmp_path):
    out = tmp_path / "out"
    first = lock_output_dir(out)
    first.release()
    second = lock_output_dir(out)
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        lock_output_dir(out)  # a second lock in the same process is refused too
    second.release()


def test_output_dir_under_a_regular_file(tmp_path):
    blocker = tmp_path / "data.jsonl"
    blocker.write_text("{}\n")
    with pytest.raises(OutputDirError) as caught:
        lock_output_dir(blocker / "out")
    assert str(caught.value) == f"cannot use output directory {blocker / 'out'}: {blocker} is a file, not a directory"
    assert blocker.read_text() == "{}\n"


def test_read_only_output_dir(tmp_path, monkeypatch):
    import errno

    out = tmp_path / "out"
    out.mkdir()
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(LOCK_NAME):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OutputDirError) as caught:
        lock_output_dir(out)
    assert str(caught.value) == (
        f"cannot take the run lock in {out}: Read-only file system; choose a writable output directory"
    )
    assert list(out.iterdir()) == []
