"""Training checkpoints: OUT/checkpoints/step_N/, atomic, verified, prunable.

A step directory holds
  - `trainer/`: model and optimizer state saved with torch.distributed.checkpoint
    (so a run resumes on a different number of processes or layout), plus ft's own
    state (step, scheduler, data reader, grad scaler, RNG) as `extra.json` and
    `extra.safetensors`, and `model_config.json`;
  - the consolidated model in the Hugging Face layout (`*.safetensors`, `config.json`,
    tokenizer files), loadable by transformers and vLLM as it is;
  - `ft-manifest.json`: every file above with its size and sha256 (see manifest.py).
A step may hold only the model (`model_only`): such a run cannot resume from it.
Everything is written to `step_N.tmp/`, fsynced, listed in the manifest and renamed
when complete (with `background=True` the writing, sealing and renaming run on a
worker thread, `ft.training.background_save`; the next save and `close()` wait for it), so a crash or power loss never leaves a half checkpoint that looks
whole. Resuming verifies the newest trainer state against its manifest and refuses,
naming the step, when it does not match. ft removes only what a manifest lists (or a
`.tmp` directory carrying its marker), and never through a symlink. Nothing is
unpickled beyond plain data: DCP's `.metadata` is checked against an allowlist of
DCP's own classes before DCP reads it, and its non-tensor items load `weights_only`.
"""

from __future__ import annotations

import fnmatch
import functools
import io
import json
import logging
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict,
)

from ft.errors import CheckpointDamagedError, CheckpointError, OutputDirError
from ft.training.background_save import BackgroundSaver, CpuStager, available_host_memory, layout_bytes
from ft.training.extra_state import ExtraStateError, load_extra_state, save_extra_state
from ft.training.manifest import (
    MANIFEST_NAME, FileRecord, Manifest, ManifestError, fsync_dir, has_incomplete_marker, read_manifest,
    remove_listed, seal, verify, write_atomic, write_incomplete_marker,
)
from ft.training.run_dirs import find_checkpoint_dir, list_step_dirs  # noqa: F401  (list_step_dirs re-exported)
from ft.training.run_lock import output_dir_error

log = logging.getLogger("ft")

# One process saving without a process group is the intended single-GPU/CPU case.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")  # save and load

TRAINER_SUBDIR = "trainer"
MODEL_FILE_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
REPLACED_SUFFIX = ".replaced"  # a step being replaced by a re-save of the same step
# Host copies of the trainer state stay for the whole run: past this share of the
# available memory, saves write from the device on the loop instead.
MAX_STAGING_SHARE_OF_HOST_MEMORY = 0.5


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def has_trainer_state(step_dir: Path) -> bool:
    trainer = step_dir / TRAINER_SUBDIR
    return (trainer / ".metadata").is_file() and (trainer / "extra.json").is_file()


def has_model(step_dir: Path) -> bool:
    return any(step_dir.glob("*.safetensors"))


def resolve_model_checkpoint(checkpoint_dir: Path, name: str) -> Path:
    """`last_checkpoint` or `checkpoint_step_N` in a run's checkpoints dir -> the step directory.

    `checkpoint_dir` may also be the run directory or an OUT with one run below it
    (`ft.training.run_dirs.find_checkpoint_dir`).
    """

    checkpoint_dir = find_checkpoint_dir(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        what = "is not a directory" if checkpoint_dir.exists() else "does not exist"
        raise CheckpointError(f"checkpoint directory {checkpoint_dir} {what}; expected a run's OUT/checkpoints")
    steps = {step: path for step, path in list_step_dirs(checkpoint_dir).items() if has_model(path)}
    available = ", ".join(f"checkpoint_step_{step}" for step in steps) or "none"
    if not steps:
        raise CheckpointError(f"{checkpoint_dir} holds no checkpoint with model weights (expected step_N/ directories)")
    if name == "last_checkpoint":
        return steps[max(steps)]
    match = re.fullmatch(r"checkpoint_step_(\d+)", name)
    if match is None or int(match.group(1)) not in steps:
        raise CheckpointError(
            f"no checkpoint '{name}' in {checkpoint_dir}; available: last_checkpoint, {available}"
        )
    return steps[int(match.group(1))]


def _keep_own_params_in_groups(optimizer_state: dict[str, Any], own_groups: list[list[str]]) -> None:
    """Add this rank's parameter names to the loaded param groups (in place). DCP saves a
    group's name list once, from one rank: where ranks hold different parameters
    (pipeline stages), the others would find none of theirs in it and load their groups
    without hyperparameters. Every rank builds the same groups in the same order."""
    for group, own in zip(optimizer_state["param_groups"], own_groups):
        group["params"] = list(dict.fromkeys([*group["params"], *own]))


def _trainer_files(manifest: Manifest) -> dict[str, FileRecord]:
    return manifest.under(TRAINER_SUBDIR)


def _model_files(manifest: Manifest) -> dict[str, FileRecord]:
    return {
        path: record for path, record in manifest.files.items()
        if "/" not in path and any(fnmatch.fnmatchcase(path, pattern) for pattern in MODEL_FILE_PATTERNS)
    }


class CheckpointManager:
    """Saves, finds, verifies, loads and prunes the checkpoints of one run."""

    def __init__(
        self,
        checkpoint_dir: Path,
        *,
        is_main: bool,
        barrier: Callable[[], None],
        keep_last_n_checkpoints: int | None,
        keep_last_n_models: int | None,
        trainable_only: bool = False,
        background: bool = False,
        single_process: bool = True,
    ) -> None:
        """`background`: write checkpoints on a worker thread. The HF export, manifest
        and rename always go there; the trainer state too on a single process (with
        several, DCP's save takes part in collectives, so it stays on the loop's thread)."""
        self.dir = checkpoint_dir
        # LoRA: the trainer state holds only trainable tensors; the frozen base comes from its checkpoint.
        # (not strict: set_state_dict would ask for the frozen keys; DCP's load already fails on missing ones)
        self.state_dict_options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
        self.is_main = is_main
        self.barrier = barrier
        self.keep_last_n_checkpoints = keep_last_n_checkpoints
        self.keep_last_n_models = keep_last_n_models
        self._verified: set[int] = set()
        self._background = BackgroundSaver() if background else None
        self._stager = CpuStager() if background and single_process else None
        self._staging_checked = False

    @property
    def in_background(self) -> bool:
        return self._background is not None

    def wait(self) -> None:
        """Wait for a save in flight (re-raising its error); a no-op without one."""
        if self._background is not None:
            self._background.wait()
            self.barrier()

    def close(self) -> None:
        """Finish the save in flight and stop the worker thread."""
        if self._background is not None:
            self._background.close()
            self._background = None
            self.barrier()

    # -- start of a run -------------------------------------------------------------

    def remove_incomplete(self) -> None:
        """Delete what an interrupted save left behind (only directories ft marked as its own)."""
        if self.is_main and self.dir.is_dir():
            for path in sorted(self.dir.glob("step_*.tmp")):
                self._remove_tmp(path)
            for path in sorted(self.dir.glob("step_*" + REPLACED_SUFFIX)):
                self._finish_replace(path)
        self.barrier()

    def latest_resumable_step(self) -> int | None:
        """The newest step with trainer state, verified against its manifest.

        Raises CheckpointDamagedError when the newest trainer state is damaged or not
        ft's: starting over would silently throw away (and later prune) the run.
        """
        for step, path in reversed(list_step_dirs(self.dir).items()):
            if path.is_symlink():
                log.warning("ignoring %s: it is a symlink; ft neither resumes from nor prunes it", path)
                continue
            manifest = self._read_manifest(path)
            if manifest is None:
                if (path / TRAINER_SUBDIR).exists():
                    raise CheckpointDamagedError(
                        f"{path} holds trainer state but no {MANIFEST_NAME}, so ft cannot tell that it wrote it "
                        f"(another tool, or an ft from before manifests); ft will not resume from it, delete it or "
                        f"start over: move {path.name} out of {self.dir}, or use a new output directory"
                    )
                log.warning("ignoring %s: ft did not write it (no %s)", path, MANIFEST_NAME)
                continue
            if not _trainer_files(manifest):
                continue  # trainer state pruned; the model files stay
            self._verify(step, path, manifest)
            return step
        return None

    # -- save -----------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        extra: dict[str, Any],
        model_config: dict[str, Any],
        export_model: Callable[[Path], Callable[[], None] | None],
        model_only: bool = False,
        export_staged: Callable[[Path, dict[str, torch.Tensor]], None] | None = None,
    ) -> Path:
        """Write step_N atomically. `export_model(dir)` writes the HF-layout model (collective);
        it may instead gather it and return the write, which then runs with the rest of the
        save (in the background when the manager has `background=True`). `export_staged(dir,
        state)`, when given, writes the model from the host copy of its full state dict
        instead, where the manager made one (one process, background saves): no second
        copy out of the device. `model_only`: no trainer state (a run cannot resume from
        such a step)."""
        self.wait()  # one save in flight at a time
        paused = time.perf_counter()
        final = self.dir / step_dir_name(step)
        tmp = self.dir / (step_dir_name(step) + ".tmp")
        write_state: Callable[[], Any] | None = None
        write_model: Callable[[], Any] | None = None
        try:
            if self.is_main:
                self._start_tmp(step, tmp, trainer=not model_only)
            self.barrier()
            self._check_staging(model, optimizer, model_only=model_only)
            staged_model: dict[str, torch.Tensor] | None = None
            if self._stager is not None:
                staged = self._stager.stage(self._state(model, optimizer, model_only=model_only))
                if not model_only:
                    write_state = functools.partial(dcp.save, staged, checkpoint_id=str(tmp / TRAINER_SUBDIR))
                staged_model = staged["model"] if not self._trainable_only else None
            elif not model_only:
                dcp.save(self._state(model, optimizer, model_only=False), checkpoint_id=str(tmp / TRAINER_SUBDIR))
            if staged_model is not None and export_staged is not None:
                write_model = functools.partial(export_staged, tmp, staged_model)
            else:
                write_model = export_model(tmp)
            if self.is_main and not model_only:
                save_extra_state(extra, tmp / TRAINER_SUBDIR)
                (tmp / TRAINER_SUBDIR / "model_config.json").write_text(json.dumps(model_config, indent=2))
        except (CheckpointException, OSError) as error:
            raise self._save_failed(step, tmp, error) from None
        except ExtraStateError as error:  # a bug in what the caller saves, not a user mistake
            raise TypeError(f"cannot save trainer state of step {step}: {error}") from None

        def finish() -> None:
            try:
                if write_state is not None:
                    write_state()
                if write_model is not None:
                    write_model()
                if self.is_main:
                    seal(tmp, step)
                    self._publish(tmp, final)
            except (CheckpointException, OSError) as error:
                raise self._save_failed(step, tmp, error) from None
            if self.is_main:
                self._verified.add(step)
                self._prune()

        if self._background is not None:
            self._background.submit(step, finish)
            log.info("writing checkpoint %s in the background (training paused %.1f s for it)", final,
                     time.perf_counter() - paused)
        else:
            finish()
            self.barrier()
        return final

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, model_only: bool = False) -> None:
        """Allocate the host buffers of background saves now, on the worker thread (call
        once the optimizer has its state, e.g. after the first step), so that the first
        save's pause is a copy, not seconds of pinning memory. `model_only`: the run's
        saves hold only the model, so only the model is copied."""
        self._check_staging(model, optimizer, model_only=model_only)
        if self._stager is not None and self._background is not None:
            layout = CpuStager.layout(self._state(model, optimizer, model_only=model_only))
            self._background.run(functools.partial(self._stager.reserve, layout))

    def _state(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, model_only: bool) -> dict[str, Any]:
        if model_only:
            return {"model": self._without_frozen(model, get_model_state_dict(model, options=self.state_dict_options))}
        model_state, optimizer_state = get_state_dict(model, optimizer, options=self.state_dict_options)
        return {"model": self._without_frozen(model, model_state), "optimizer": optimizer_state}

    def _without_frozen(self, model: nn.Module, model_state: dict[str, Any]) -> dict[str, Any]:
        """LoRA: torch drops a frozen parameter under its first name only; a tied one (Llama
        3.2's lm_head) stays under the second, 0.5 GiB of base weights in every 1B checkpoint."""
        if not self._trainable_only:
            return model_state
        frozen = {_storage(p) for p in model.parameters() if not p.requires_grad}
        return {name: value for name, value in model_state.items()
                if not (isinstance(value, torch.Tensor) and _storage(value) in frozen)}

    @property
    def _trainable_only(self) -> bool:
        return self.state_dict_options.ignore_frozen_params

    def _check_staging(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, model_only: bool) -> None:
        """Once: keep host copies only where they fit beside everything else in host memory."""
        if self._staging_checked or self._stager is None:
            return
        self._staging_checked = True
        needed = layout_bytes(CpuStager.layout(self._state(model, optimizer, model_only=model_only)))
        available = available_host_memory()
        if available is not None and needed > MAX_STAGING_SHARE_OF_HOST_MEMORY * available:
            log.warning("checkpoint state (%.1f GiB) is too large to copy to host memory (%.1f GiB available): "
                        "checkpoints write it from the device, pausing training for the write", needed / 2**30,
                        available / 2**30)
            self._stager = None

    def _start_tmp(self, step: int, tmp: Path, *, trainer: bool = True) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if (tmp.exists() or tmp.is_symlink()) and not self._remove_tmp(tmp):
            raise CheckpointError(
                f"cannot save step {step}: {tmp} exists and ft did not write it; move it out of {self.dir}"
            )
        tmp.mkdir()
        write_incomplete_marker(tmp, step)
        if trainer:
            (tmp / TRAINER_SUBDIR).mkdir()

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename the sealed tmp dir to its final name, replacing an earlier save of the same step."""
        if not (final.exists() or final.is_symlink()):
            tmp.rename(final)
            fsync_dir(self.dir)
            return
        if final.is_symlink() or self._read_manifest(final, quiet=True) is None:
            raise CheckpointError(
                f"cannot replace {final}: ft did not write it (a symlink, or no {MANIFEST_NAME}); "
                f"move it out of {self.dir} and re-run"
            )
        replaced = final.with_name(final.name + REPLACED_SUFFIX)
        final.rename(replaced)
        tmp.rename(final)
        fsync_dir(self.dir)
        self._finish_replace(replaced)

    def _save_failed(self, step: int, tmp: Path, error: BaseException) -> Exception:
        cause = _root_cause(error)
        if isinstance(cause, KeyboardInterrupt):  # a second signal during the save: stop now
            raise KeyboardInterrupt
        if self.is_main and has_incomplete_marker(tmp):
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        newest = max((s for s, p in list_step_dirs(self.dir).items() if s != step), default=None)
        kept = f"the newest complete checkpoint is step_{newest}" if newest is not None else "no checkpoint was kept"
        if isinstance(cause, OSError):
            where = f"write checkpoint step_{step}"
            problem = output_dir_error(self.dir, cause, where)
            return OutputDirError(f"{problem}" + (f" ({cause.filename})" if cause.filename else "") + f"; {kept}")
        if isinstance(cause, CheckpointError):
            return type(cause)(f"{cause}; {kept}")
        return CheckpointError(f"cannot write checkpoint step_{step} to {tmp}: {_one_line(cause)}; {kept}")

    # -- load -----------------------------------------------------------------------

    def load(
        self,
        step: int,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        model_config: dict[str, Any],
    ) -> dict[str, Any]:
        """Restore model and optimizer in place; return the extra state."""
        step_dir = self.dir / step_dir_name(step)
        if step not in self._verified:
            manifest = self._read_manifest(step_dir)
            if manifest is None or not _trainer_files(manifest):
                raise CheckpointError(f"{step_dir} holds no trainer state written by ft ({MANIFEST_NAME} lists none)")
            self._verify(step, step_dir, manifest)
        self.check_model_config(step_dir, model_config)
        trainer_dir = step_dir / TRAINER_SUBDIR
        check_dcp_metadata(trainer_dir / ".metadata")
        state = self._state(model, optimizer, model_only=False)
        own_groups = [list(group["params"]) for group in state["optimizer"]["param_groups"]]
        try:
            dcp.load(state, checkpoint_id=str(trainer_dir), planner=_PlainDataLoadPlanner())
        except (CheckpointException, Exception) as error:  # DCP raises a wide range of errors for mismatched state
            cause = _root_cause(error)
            if isinstance(cause, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            if isinstance(cause, CheckpointError):
                raise type(cause)(f"cannot restore trainer state from {trainer_dir}: {cause}") from None
            raise CheckpointError(f"cannot restore trainer state from {trainer_dir}: {_one_line(cause)}") from None
        _keep_own_params_in_groups(state["optimizer"], own_groups)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=self.state_dict_options)
        try:
            return load_extra_state(trainer_dir)
        except ExtraStateError as error:
            raise CheckpointDamagedError(f"cannot read trainer state {trainer_dir}/extra.*: {error}") from None

    @staticmethod
    def check_model_config(step_dir: Path, model_config: dict[str, Any]) -> None:
        saved_file = step_dir / TRAINER_SUBDIR / "model_config.json"
        if not saved_file.is_file():
            return
        saved = json.loads(saved_file.read_text())
        differing = sorted(k for k in set(saved) | set(model_config) if saved.get(k) != model_config.get(k))
        if differing:
            details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs model {model_config.get(k)!r}" for k in differing[:4])
            raise CheckpointError(
                f"checkpoint {step_dir} was written for a different model ({details}); "
                f"use a new output directory or the same model"
            )

    # -- verification and ownership -------------------------------------------------

    def _read_manifest(self, step_dir: Path, *, quiet: bool = False) -> Manifest | None:
        try:
            return read_manifest(step_dir)
        except ManifestError as error:
            if quiet:
                return None
            raise CheckpointDamagedError(
                f"checkpoint {step_dir} is damaged: {error}; ft will not resume from it, delete it or start over: "
                f"move {step_dir.name} out of {self.dir}, or use a new output directory"
            ) from None

    def _verify(self, step: int, step_dir: Path, manifest: Manifest) -> None:
        if step in self._verified:
            return
        problems = verify(step_dir, _trainer_files(manifest) | _model_files(manifest))
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            older = [s for s, p in list_step_dirs(self.dir).items() if s < step and not p.is_symlink()
                     and (p / TRAINER_SUBDIR).is_dir()]
            fallback = f"to resume from step_{max(older)}" if older else "to start over"
            raise CheckpointDamagedError(
                f"checkpoint {step_dir} is damaged: {problems[0]}{more}; ft will not resume from it or start over. "
                f"Move {step_dir.name} out of {self.dir} {fallback}, or use a new output directory"
            )
        self._verified.add(step)

    def _remove_tmp(self, path: Path) -> bool:
        """Remove a leftover `step_N.tmp` if ft made it; return whether it is gone."""
        if path.is_symlink() or not path.is_dir():
            log.warning("leaving %s alone: not a directory ft made", path)
            return False
        if has_incomplete_marker(path) or (path / MANIFEST_NAME).is_file() or not any(path.iterdir()):
            log.warning("removing incomplete checkpoint %s", path)
            shutil.rmtree(path)  # does not follow symlinks inside
            return True
        log.warning("leaving %s alone: ft did not write it (no ft marker)", path)
        return False

    def _finish_replace(self, replaced: Path) -> None:
        """Complete a replace interrupted after `step_N` was moved aside."""
        final = replaced.with_name(replaced.name[: -len(REPLACED_SUFFIX)])
        manifest = None if replaced.is_symlink() else self._read_manifest(replaced, quiet=True)
        if manifest is None:
            log.warning("leaving %s alone: ft did not write it", replaced)
        elif final.exists() or final.is_symlink():
            self._remove_owned(replaced, manifest)
        else:  # the new copy never arrived: the old one is still the checkpoint
            replaced.rename(final)
            fsync_dir(self.dir)

    def _owned_steps(self) -> dict[int, tuple[Path, Manifest]]:
        owned = {}
        for step, path in list_step_dirs(self.dir).items():
            manifest = None if path.is_symlink() else self._read_manifest(path, quiet=True)
            if manifest is not None:
                owned[step] = (path, manifest)
        return owned

    def _drop(self, step_dir: Path, manifest: Manifest, records: dict[str, FileRecord]) -> Manifest:
        """Remove some of a step's files: shrink the manifest first, then unlink."""
        remaining = Manifest(step=manifest.step, files={k: v for k, v in manifest.files.items() if k not in records})
        write_atomic(step_dir / MANIFEST_NAME, remaining.to_json())
        for rel in remove_listed(step_dir, records):
            log.warning("pruning %s: left %s alone (changed since ft wrote it)", step_dir, rel)
        return remaining

    def _remove_owned(self, step_dir: Path, manifest: Manifest) -> None:
        kept = remove_listed(step_dir, manifest.files)
        (step_dir / MANIFEST_NAME).unlink(missing_ok=True)
        try:
            step_dir.rmdir()
        except OSError:
            log.warning("pruning %s: left files ft did not write (%s)", step_dir,
                        ", ".join(kept) or ", ".join(p.name for p in list(step_dir.iterdir())[:5]))

    def _prune(self) -> None:
        owned = self._owned_steps()
        with_state = [step for step, (_, m) in owned.items() if _trainer_files(m)]
        with_model = [step for step, (_, m) in owned.items() if _model_files(m)]
        if self.keep_last_n_checkpoints is not None:
            for step in with_state[: -self.keep_last_n_checkpoints or None]:
                path, manifest = owned[step]
                owned[step] = (path, self._drop(path, manifest, _trainer_files(manifest)))
                self._verified.discard(step)
        if self.keep_last_n_models is not None:
            for step in with_model[: -self.keep_last_n_models or None]:
                path, manifest = owned[step]
                owned[step] = (path, self._drop(path, manifest, _model_files(manifest)))
        for path, manifest in owned.values():
            if not _trainer_files(manifest) and not _model_files(manifest):
                self._remove_owned(path, manifest)


# -- no code from a checkpoint ------------------------------------------------------

_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "BytesStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch._utils": {"_get_layout"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = name in _DCP_METADATA_CLASSES.get(module, ())
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise CheckpointDamagedError(f"it names {module}.{name}, which is not part of DCP's metadata")
        return super().find_class(module, name)


def _storage(tensor: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.data_ptr(), tuple(local.shape)


def check_dcp_metadata(path: Path) -> None:
    """Refuse a DCP `.metadata` pickle that would build anything but DCP's own metadata.

    DCP reads `.metadata` with plain `pickle.load`; unpickling it here first with an
    allowlist means the bytes DCP then reads can only build metadata objects.
    """
    try:
        with open(path, "rb") as file:
            _MetadataUnpickler(file).load()
    except CheckpointDamagedError as error:
        raise CheckpointDamagedError(f"refusing to read {path}: {error}") from None
    except Exception as error:  # truncated or garbage pickle
        raise CheckpointDamagedError(f"cannot read {path}: {_one_line(error)}") from None


class _PlainDataLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, but non-tensor items (optimizer hyper-parameters) must be plain data."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except Exception as error:
            raise CheckpointDamagedError(
                f"item {read_item.dest_index.fqn} is not plain data ({_one_line(error)})"
            ) from None
        value.seek(0)
        super().load_bytes(read_item, value)


def _root_cause(error: BaseException) -> BaseException:
    """The first underlying failure of a DCP CheckpointException (which derives from BaseException)."""
    seen = 0
    while isinstance(error, CheckpointException) and error.failures and seen < 8:
        error = next(iter(error.failures.values()))[0]
        seen += 1
    return error


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(error, OSError) and error.strerror:
        first = error.strerror + (f": {error.filename}" if error.filename else "")
    return f"{type(error).__name__}: {first[:300]}"


