"""Checkpoints run no code, delete only what ft wrote, catch corruption, and fail in one line.

Every test that provokes a failure checks the error type and message, and that the
files already on disk are byte-for-byte unchanged (sha256).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ft.errors import CheckpointDamagedError, CheckpointError, OutputDirError
from ft.training import checkpoint as checkpoint_module
from ft.training.checkpoint import CheckpointManager, check_dcp_metadata
from ft.training.extra_state import load_extra_state, save_extra_state
from ft.training.manifest import MANIFEST_NAME, read_manifest

MODEL_CONFIG = {"dim": 4}


def make_model(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    return model, optimizer


def train_step(model, optimizer) -> None:
    model(torch.randn(3, 4)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def manager(directory: Path, keep_checkpoints: int | None = None, keep_models: int | None = None) -> CheckpointManager:
    return CheckpointManager(directory, is_main=True, barrier=lambda: None,
                             keep_last_n_checkpoints=keep_checkpoints, keep_last_n_models=keep_models)


def save(mgr: CheckpointManager, step: int, model, optimizer, extra: dict | None = None) -> Path:
    def export(directory: Path) -> None:
        save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
        (directory / "config.json").write_text("{}")

    return mgr.save(step, model=model, optimizer=optimizer, extra=extra or {"step": step},
                    model_config=MODEL_CONFIG, export_model=export)


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root (not following symlinks), and symlink targets."""
    found = {}
    for directory, dirs, files in os.walk(root, followlinks=False):
        for name in files + [d for d in dirs if (Path(directory) / d).is_symlink()]:
            path = Path(directory) / name
            key = str(path.relative_to(root))
            found[key] = ("->" + os.readlink(path)) if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture
def run(tmp_path):
    """A run with steps 1..3 saved (trainer state and model in each)."""
    model, optimizer = make_model()
    mgr = manager(tmp_path / "out" / "checkpoints")
    for step in (1, 2, 3):
        train_step(model, optimizer)
        save(mgr, step, model, optimizer)
    return mgr


class Evil:
    """Unpickling this writes a marker file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


# -- extra state: exact round trip, no pickle -------------------------------------------------


def test_extra_state_round_trips_exactly(tmp_path):
    model, optimizer = make_model()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    train_step(model, optimizer)
    scheduler.step()
    state = {
        "step": 7, "scheduler": scheduler.state_dict(),
        "rng": {"cpu": torch.get_rng_state(), "extra": torch.arange(5, dtype=torch.int64)},
        "python_random": (3, tuple(range(625)), None), "floats": [0.1, 1e-300, float("nan"), float("inf"), -0.0],
        "bytes": b"\x00\xff", "int_keys": {0: "a", 5: "b"}, "tagged": {"__ft_tensor__": "not a tag"},
        "big": 2**80, "flag": True, "scaler": {},
    }
    save_extra_state(state, tmp_path)
    loaded = load_extra_state(tmp_path)
    assert torch.equal(loaded["rng"]["cpu"], state["rng"]["cpu"]) and loaded["rng"]["cpu"].dtype == torch.uint8
    assert torch.equal(loaded["rng"]["extra"], state["rng"]["extra"])
    assert loaded["scheduler"] == state["scheduler"]
    assert loaded["python_random"] == state["python_random"] and isinstance(loaded["python_random"][1], tuple)
    assert [repr(x) for x in loaded["floats"]] == [repr(x) for x in state["floats"]]
    for key in ("bytes", "int_keys", "tagged", "big", "flag", "scaler", "step"):
        assert loaded[key] == state[key] and type(loaded[key]) is type(state[key])


def test_save_and_load_restore_model_optimizer_and_rng_bitwise(tmp_path):
    model, optimizer = make_model()
    train_step(model, optimizer)
    mgr = manager(tmp_path / "checkpoints")
    rng = torch.get_rng_state()
    save(mgr, 1, model, optimizer, extra={"step": 1, "rng": {"cpu": rng}})
    expected = torch.randn(8)  # what the uninterrupted run draws next

    model2, optimizer2 = make_model(seed=1)
    mgr2 = manager(tmp_path / "checkpoints")
    assert mgr2.latest_resumable_step() == 1
    extra = mgr2.load(1, model=model2, optimizer=optimizer2, model_config=MODEL_CONFIG)
    torch.set_rng_state(extra["rng"]["cpu"])
    assert torch.equal(torch.randn(8), expected)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.state.values(), optimizer2.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # Training on continues identically.
    torch.manual_seed(3)
    train_step(model, optimizer)
    torch.manual_seed(3)
    train_step(model2, optimizer2)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)


def test_manifest_lists_every_file_with_size_and_hash(run):
    step_dir = run.dir / "step_3"
    manifest = read_manifest(step_dir)
    on_disk = {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    assert set(manifest.files) == on_disk
    assert {"trainer/.metadata", "trainer/extra.json", "model.safetensors"} <= on_disk
    assert not (step_dir / "trainer" / "extra.pt").exists()
    record = manifest.files["model.safetensors"]
    assert record.sha256 == hashlib.sha256((step_dir / "model.safetensors").read_bytes()).hexdigest()


# -- no code from a checkpoint ----------------------------------------------------------------


def test_crafted_extra_pt_in_a_step_without_manifest_does_not_run(run, tmp_path):
    marker = tmp_path / "marker"
    step_dir = run.dir / "step_4"
    (step_dir / "trainer").mkdir(parents=True)
    (step_dir / "trainer" / ".metadata").write_bytes((run.dir / "step_3" / "trainer" / ".metadata").read_bytes())
    torch.save({"step": Evil(marker)}, step_dir / "trainer" / "extra.pt")
    before = snapshot(run.dir)
    with pytest.raises(CheckpointDamagedError, match=r"step_4 holds trainer state but no ft-manifest.json.*move step_4 out"):
        manager(run.dir).latest_resumable_step()
    assert not marker.exists()
    assert snapshot(run.dir) == before


def test_crafted_extra_pt_in_an_ft_step_is_never_read(run, tmp_path):
    marker = tmp_path / "marker"
    torch.save({"step": Evil(marker)}, run.dir / "step_3" / "trainer" / "extra.pt")
    mgr = manager(run.dir)
    assert mgr.latest_resumable_step() == 3  # not in the manifest: ignored, not loaded
    model, optimizer = make_model()
    assert mgr.load(3, model=model, optimizer=optimizer, model_config=MODEL_CONFIG) == {"step": 3}
    assert not marker.exists()


def test_crafted_dcp_metadata_does_not_run_even_with_a_forged_manifest(run, tmp_path):
    marker = tmp_path / "marker"
    step_dir = run.dir / "step_3"
    metadata = step_dir / "trainer" / ".metadata"
    metadata.write_bytes(pickle.dumps(Evil(marker)))
    manifest = json.loads((step_dir / MANIFEST_NAME).read_text())  # forged to match, as an attacker would
    manifest["files"]["trainer/.metadata"] = {"size": metadata.stat().st_size,
                                              "sha256": hashlib.sha256(metadata.read_bytes()).hexdigest()}
    (step_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    before = snapshot(run.dir)
    mgr = manager(run.dir)
    assert mgr.latest_resumable_step() == 3
    model, optimizer = make_model()
    with pytest.raises(CheckpointDamagedError, match=r"refusing to read .*step_3/trainer/.metadata: it names pathlib.*write_text"):
        mgr.load(3, model=model, optimizer=optimizer, model_config=MODEL_CONFIG)
    assert not marker.exists()
    assert snapshot(run.dir) == before


def test_dcp_metadata_allowlist_accepts_what_dcp_writes(run):
    check_dcp_metadata(run.dir / "step_3" / "trainer" / ".metadata")


def test_non_tensor_dcp_item_must_be_plain_data(tmp_path):
    import io

    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    marker = tmp_path / "marker"
    buffer = io.BytesIO()
    torch.save(Evil(marker), buffer)
    buffer.seek(0)
    item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex("optimizer.param_groups.0.lr"),
                    dest_offsets=torch.Size([0]), storage_index=MetadataIndex("x"),
                    storage_offsets=torch.Size([0]), lengths=torch.Size([0]))
    with pytest.raises(CheckpointDamagedError, match="item optimizer.param_groups.0.lr is not plain data"):
        checkpoint_module._PlainDataLoadPlanner().load_bytes(item, buffer)
    assert not marker.exists()


# -- corruption is caught on resume -----------------------------------------------------------


@pytest.mark.parametrize("damage, message", [
    ("garbage", r"trainer/__0_0.distcp has changed since it was written \(sha256 differs\)"),
    ("truncate", r"trainer/__0_0.distcp has \d+ bytes, \d+ were written"),
    ("delete", r"trainer/__0_0.distcp is missing"),
    ("model", r"model.safetensors has changed since it was written"),
])
def test_damaged_newest_state_refuses_naming_step_and_fix(run, damage, message):
    step_dir = run.dir / "step_3"
    shard = step_dir / "trainer" / "__0_0.distcp"
    if damage == "garbage":
        data = bytearray(shard.read_bytes())
        data[100:4196] = os.urandom(4096)[: len(data[100:4196])]
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "delete":
        shard.unlink()
    else:
        data = bytearray((step_dir / "model.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (step_dir / "model.safetensors").write_bytes(bytes(data))
    before = snapshot(run.dir)
    mgr = manager(run.dir, keep_checkpoints=1, keep_models=1)
    with pytest.raises(CheckpointDamagedError) as caught:
        mgr.latest_resumable_step()
    text = str(caught.value)
    assert "\n" not in text
    assert f"checkpoint {step_dir} is damaged" in text
    assert "Move step_3 out of" in text and "to resume from step_2" in text
    import re
    assert re.search(message, text)
    assert snapshot(run.dir) == before


def test_malformed_manifest_refuses(run):
    (run.dir / "step_3" / MANIFEST_NAME).write_text('{"format": "ft-checkpoint", "version": 1, "files": {"../x": 1}')
    before = snapshot(run.dir)
    with pytest.raises(CheckpointDamagedError, match=r"step_3 is damaged: ft-manifest.json is malformed"):
        manager(run.dir).latest_resumable_step()
    assert snapshot(run.dir) == before


def test_manifest_with_a_path_outside_the_step_is_refused(run):
    path = run.dir / "step_3" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["files"]["../../victim"] = {"size": 1, "sha256": "0"}
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointDamagedError, match=r"lists the path '../../victim', which is not inside"):
        manager(run.dir).latest_resumable_step()


# -- ft deletes only what it wrote ------------------------------------------------------------


def test_pruning_never_follows_a_symlinked_step(tmp_path):
    other = tmp_path / "other_run" / "checkpoints"
    model, optimizer = make_model()
    save(manager(other), 1, model, optimizer)
    other_before = snapshot(tmp_path / "other_run")

    mine = tmp_path / "mine" / "checkpoints"
    mine.mkdir(parents=True)
    (mine / "step_1").symlink_to(other / "step_1", target_is_directory=True)
    mgr = manager(mine, keep_checkpoints=1, keep_models=1)
    for step in (2, 3):
        save(mgr, step, model, optimizer)
    assert snapshot(tmp_path / "other_run") == other_before
    assert (mine / "step_1").is_symlink()
    assert sorted(p.name for p in mine.iterdir()) == ["step_1", "step_3"]


def test_pruning_leaves_foreign_step_dirs_and_unknown_files(run):
    foreign = run.dir / "step_0"  # another tool's layout
    foreign.mkdir()
    (foreign / "model.pt").write_bytes(b"not ft's")
    (foreign / "model.safetensors").write_bytes(b"not ft's either")
    (run.dir / "step_1" / "notes.txt").write_text("mine")
    (run.dir / "step_1" / "trainer" / "user.bin").write_bytes(b"mine too")
    kept_before = {k: v for k, v in snapshot(run.dir).items()
                   if k.startswith("step_0") or k.endswith(("notes.txt", "user.bin"))}
    model, optimizer = make_model()
    mgr = manager(run.dir, keep_checkpoints=1, keep_models=1)
    save(mgr, 4, model, optimizer)
    after = snapshot(run.dir)
    assert {k: after.get(k) for k in kept_before} == kept_before
    assert sorted(p.name for p in (run.dir / "step_1").rglob("*")) == ["notes.txt", "trainer", "user.bin"]
    assert not (run.dir / "step_2").exists() and not (run.dir / "step_3").exists()
    assert (run.dir / "step_4" / "trainer").is_dir()


def test_pruning_leaves_a_listed_file_that_changed_size(run):
    model, optimizer = make_model()
    changed = run.dir / "step_1" / "model.safetensors"
    changed.write_bytes(b"replaced by the user")
    mgr = manager(run.dir, keep_checkpoints=1, keep_models=1)
    save(mgr, 4, model, optimizer)
    assert changed.read_bytes() == b"replaced by the user"
    assert sorted(p.name for p in (run.dir / "step_1").iterdir()) == ["model.safetensors"]


def test_foreign_tmp_dir_is_left_and_blocks_only_its_own_step(run):
    foreign = run.dir / "step_5.tmp"
    foreign.mkdir()
    (foreign / "data").write_text("someone else's")
    before = snapshot(run.dir)
    mgr = manager(run.dir)
    mgr.remove_incomplete()
    assert snapshot(run.dir) == before
    model, optimizer = make_model()
    with pytest.raises(CheckpointError, match=r"cannot save step 5: .*step_5.tmp exists and ft did not write it; move it out"):
        save(mgr, 5, model, optimizer)
    assert snapshot(run.dir) == before


def test_tmp_dir_ft_left_behind_is_removed(run):
    from ft.training.manifest import write_incomplete_marker

    leftover = run.dir / "step_4.tmp"
    (leftover / "trainer").mkdir(parents=True)
    write_incomplete_marker(leftover, 4)
    (leftover / "model.safetensors").write_bytes(b"half a file")
    before = snapshot(run.dir)
    manager(run.dir).remove_incomplete()
    assert not leftover.exists()
    assert snapshot(run.dir) == {k: v for k, v in before.items() if not k.startswith("step_4.tmp")}


def test_resaving_a_step_replaces_it_and_an_interrupted_replace_recovers(run):
    model, optimizer = make_model(seed=5)
    save(run, 3, model, optimizer)
    assert sorted(p.name for p in run.dir.iterdir()) == ["step_1", "step_2", "step_3"]
    # Crash after step_3 was moved aside and before the new one arrived: the old one comes back.
    (run.dir / "step_3").rename(run.dir / "step_3.replaced")
    before = snapshot(run.dir / "step_3.replaced")
    manager(run.dir).remove_incomplete()
    assert snapshot(run.dir / "step_3") == before and not (run.dir / "step_3.replaced").exists()


def test_resave_refuses_to_replace_a_step_ft_did_not_write(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step_1").mkdir(parents=True)
    (checkpoints / "step_1" / "model.safetensors").write_bytes(b"theirs")
    before = snapshot(checkpoints)
    model, optimizer = make_model()
    with pytest.raises(CheckpointError, match=r"cannot replace .*step_1: ft did not write it"):
        save(manager(checkpoints), 1, model, optimizer)
    after = snapshot(checkpoints)
    assert {k: v for k, v in after.items() if k.startswith("step_1/")} == before


# -- write failures: one line, nothing damaged left -------------------------------------------


def test_disk_full_during_dcp_save_is_one_line_and_leaves_no_tmp(run, monkeypatch):
    import torch.distributed.checkpoint.filesystem as fs

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "shard")

    monkeypatch.setattr(fs, "_write_item", full)
    before = snapshot(run.dir)
    model, optimizer = make_model()
    with pytest.raises(OutputDirError) as caught:
        save(run, 4, model, optimizer)
    text = str(caught.value)
    assert "\n" not in text
    assert "cannot write checkpoint step_4" in text and "no space left on the device" in text
    assert "the newest complete checkpoint is step_3" in text
    assert snapshot(run.dir) == before
    assert sorted(p.name for p in run.dir.iterdir()) == ["step_1", "step_2", "step_3"]


def test_dcp_failure_is_one_line_checkpoint_error(run, monkeypatch):
    import torch.distributed.checkpoint.filesystem as fs

    def broken(*args, **kwargs):
        raise RuntimeError("enforce fail at inline_container.cc:603 . unexpected pos 128 vs 64\nmore detail")

    monkeypatch.setattr(fs, "_write_item", broken)
    before = snapshot(run.dir)
    model, optimizer = make_model()
    with pytest.raises(CheckpointError) as caught:
        save(run, 4, model, optimizer)
    assert str(caught.value).startswith(f"cannot write checkpoint step_4 to {run.dir / 'step_4.tmp'}: RuntimeError: enforce")
    assert "\n" not in str(caught.value)
    assert snapshot(run.dir) == before


def test_checkpoint_dir_under_a_regular_file(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("a file")
    model, optimizer = make_model()
    with pytest.raises(OutputDirError, match=rf"{blocker} is a file, not a directory"):
        save(manager(blocker / "checkpoints"), 1, model, optimizer)
    assert blocker.read_text() == "a file"


def test_read_only_checkpoint_dir(tmp_path, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name.endswith(".tmp"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    model, optimizer = make_model()
    with pytest.raises(OutputDirError, match=r"cannot write checkpoint step_1 in .*: Read-only file system; choose a writable"):
        save(manager(checkpoints), 1, model, optimizer)
    assert list(checkpoints.iterdir()) == []


def test_restore_into_a_different_model_is_one_line(run):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    optimizer = torch.optim.AdamW(model.parameters())
    mgr = manager(run.dir)
    before = snapshot(run.dir)
    with pytest.raises(CheckpointError) as caught:
        mgr.load(3, model=model, optimizer=optimizer, model_config=MODEL_CONFIG)
    text = str(caught.value)
    assert text.startswith(f"cannot restore trainer state from {run.dir / 'step_3' / 'trainer'}: ")
    assert "\n" not in text and "Traceback" not in text
    assert snapshot(run.dir) == before


def test_second_signal_during_save_is_a_plain_keyboard_interrupt(run, monkeypatch):
    """DCP wraps what it catches in CheckpointException (a BaseException that the CLI
    would print as a traceback); save re-raises the interrupt, which the CLI turns
    into exit 130 without one."""
    import signal

    import torch.distributed.checkpoint.filesystem as fs

    from ft.training.stop_signal import StopSignal

    real_write = fs._write_item

    def write_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the second signal arrives mid-save
        return real_write(*args, **kwargs)

    before = snapshot(run.dir)
    model, optimizer = make_model()
    with StopSignal():
        os.kill(os.getpid(), signal.SIGTERM)  # the first: finish the step and save
        monkeypatch.setattr(fs, "_write_item", write_then_signal)
        with pytest.raises(KeyboardInterrupt) as caught:
            save(run, 4, model, optimizer)
    assert type(caught.value) is KeyboardInterrupt
    assert {k: v for k, v in snapshot(run.dir).items() if not k.startswith("step_4.tmp")} == before
    mgr = manager(run.dir)
    mgr.remove_incomplete()
    assert mgr.latest_resumable_step() == 3
    assert snapshot(run.dir) == before


def test_exit_codes_are_distinct():
    from ft.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_STOPPED, ConfigError, FtError

    assert len({EXIT_OK, EXIT_STOPPED, EXIT_INTERRUPTED, FtError.exit_code, ConfigError.exit_code}) == 5
