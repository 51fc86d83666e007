"""What ft wrote into a checkpoint step directory, and proof that it is still there.

Every complete `step_N/` holds `ft-manifest.json`: each file ft wrote, by path
relative to the step directory, with its size and sha256. ft verifies the files
against it before it resumes, and removes only files that it lists (and only
when they are still regular files of the listed size, never through a symlink).
The manifest is JSON, so reading it runs no code.

An unfinished `step_N.tmp/` holds `ft-incomplete.json` from its first moment, so
ft can tell a save it left behind from a directory someone else made.

Hashing runs in threads (hashlib releases the GIL on large buffers), so a
checkpoint of many shard files hashes at disk speed rather than one core's.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MANIFEST_NAME = "ft-manifest.json"
INCOMPLETE_MARKER = "ft-incomplete.json"
FORMAT = "ft-checkpoint"
VERSION = 1
_CHUNK = 8 << 20


@dataclass(frozen=True, kw_only=True)
class FileRecord:
    size: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class Manifest:
    step: int
    files: dict[str, FileRecord]  # relative POSIX path -> record

    def under(self, prefix: str) -> dict[str, FileRecord]:
        return {path: record for path, record in self.files.items() if path.startswith(prefix + "/")}

    def to_json(self) -> str:
        files = {path: {"size": r.size, "sha256": r.sha256} for path, r in sorted(self.files.items())}
        return json.dumps({"format": FORMAT, "version": VERSION, "step": self.step, "files": files}, indent=1)


class ManifestError(Exception):
    """A manifest that cannot be read or trusted (the caller names the step)."""


def hash_file(path: Path) -> FileRecord:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileRecord(size=size, sha256=digest.hexdigest())


def _hash_all(root: Path, relative_paths: list[str]) -> dict[str, FileRecord]:
    workers = max(1, min(8, os.cpu_count() or 1, len(relative_paths)))
    with ThreadPoolExecutor(workers) as pool:
        records = pool.map(lambda rel: hash_file(root / rel), relative_paths)
        return dict(zip(relative_paths, records))


def regular_files(root: Path) -> list[str]:
    """Every regular file under `root` (relative POSIX paths), not following symlinks."""
    found = []
    for directory, _, names in os.walk(root, followlinks=False):
        for name in names:
            path = Path(directory) / name
            if stat.S_ISREG(path.lstat().st_mode):
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a fsynced temporary file and a rename."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_incomplete_marker(step_dir: Path, step: int) -> None:
    info = {"format": FORMAT, "step": step, "pid": os.getpid(), "host": socket.gethostname()}
    (step_dir / INCOMPLETE_MARKER).write_text(json.dumps(info))


def has_incomplete_marker(step_dir: Path) -> bool:
    marker = step_dir / INCOMPLETE_MARKER
    return marker.is_file() and not marker.is_symlink()


def seal(step_dir: Path, step: int) -> Manifest:
    """Fsync and hash everything under `step_dir`, write the manifest, drop the marker.

    Called on a `.tmp` directory just before it is renamed: after this, every
    byte the manifest describes is on disk.
    """
    (step_dir / INCOMPLETE_MARKER).unlink(missing_ok=True)
    paths = [p for p in regular_files(step_dir) if p != MANIFEST_NAME]
    for rel in paths:
        fsync_file(step_dir / rel)
    for directory in {(step_dir / rel).parent for rel in paths} | {step_dir}:
        fsync_dir(directory)
    manifest = Manifest(step=step, files=_hash_all(step_dir, paths))
    write_atomic(step_dir / MANIFEST_NAME, manifest.to_json())
    return manifest


def _check_relative(path: str) -> None:
    parts = PurePosixPath(path).parts
    if not parts or PurePosixPath(path).is_absolute() or any(p in ("", ".", "..") for p in parts) or "\\" in path:
        raise ManifestError(f"it lists the path {path!r}, which is not inside the step directory")


def read_manifest(step_dir: Path) -> Manifest | None:
    """The step's manifest; None when it has none. ManifestError when it is unreadable."""
    path = step_dir / MANIFEST_NAME
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        raise ManifestError(f"{MANIFEST_NAME} is not a regular file")
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ManifestError(f"{MANIFEST_NAME} is not an ft checkpoint manifest")
        if data.get("version") != VERSION:
            raise ManifestError(f"{MANIFEST_NAME} has version {data.get('version')!r}; this ft reads {VERSION}")
        files = {}
        for rel, record in data["files"].items():
            _check_relative(rel)
            size, sha = record["size"], record["sha256"]
            if not isinstance(size, int) or not isinstance(sha, str):
                raise ManifestError(f"{MANIFEST_NAME} has a malformed entry for {rel!r}")
            files[rel] = FileRecord(size=size, sha256=sha)
        return Manifest(step=int(data["step"]), files=files)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ManifestError(f"{MANIFEST_NAME} is malformed ({type(error).__name__}: {error})") from None


def _is_real_dir_chain(step_dir: Path, rel: str) -> bool:
    """True when every directory between `step_dir` and the file is a real directory."""
    current = step_dir
    for part in PurePosixPath(rel).parts[:-1]:
        current = current / part
        try:
            if not stat.S_ISDIR(current.lstat().st_mode):
                return False
        except FileNotFoundError:
            return False
    return True


def verify(step_dir: Path, records: dict[str, FileRecord]) -> list[str]:
    """Problems with the listed files (missing, wrong size, wrong hash); empty when all match."""
    problems, to_hash = [], []
    for rel, record in sorted(records.items()):
        path = step_dir / rel
        if not _is_real_dir_chain(step_dir, rel) or not path.exists() and not path.is_symlink():
            problems.append(f"{rel} is missing")
            continue
        mode = path.lstat().st_mode
        if not stat.S_ISREG(mode):
            problems.append(f"{rel} is not a regular file")
        elif path.lstat().st_size != record.size:
            problems.append(f"{rel} has {path.lstat().st_size} bytes, {record.size} were written")
        else:
            to_hash.append(rel)
    if to_hash:
        for rel, actual in _hash_all(step_dir, to_hash).items():
            if actual.sha256 != records[rel].sha256:
                problems.append(f"{rel} has changed since it was written (sha256 differs)")
    return problems


def remove_listed(step_dir: Path, records: dict[str, FileRecord]) -> list[str]:
    """Unlink the listed files that are still what ft wrote; return the ones left alone.

    A listed path that is now a symlink, a directory, or a file of another size is
    not removed: ft cannot prove it wrote it. Directories that become empty are
    removed too (never through a symlink).
    """
    kept = []
    for rel, record in sorted(records.items()):
        path = step_dir / rel
        if not _is_real_dir_chain(step_dir, rel):
            kept.append(rel)
            continue
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_size != record.size:
            kept.append(rel)
            continue
        path.unlink()
    # Innermost first, so a parent empties after its children.
    parents = {parent for rel in records if _is_real_dir_chain(step_dir, rel)
               for parent in (step_dir / rel).parents if step_dir in parent.parents}
    for directory in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        try:
            directory.rmdir()
        except OSError:  # not empty (something ft did not write) or already gone
            pass
    return kept
