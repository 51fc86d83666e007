"""Training checkpoints: OUT/checkpoints/step_N/, atomic, sharded, prunable.

A step directory holds
  - `trainer/`: model and optimizer state saved with torch.distributed.checkpoint
    (so a run resumes on a different number of processes or layout), plus
    `extra.pt` (step, scheduler, data reader, grad scaler, RNG) and `model_config.json`;
  - the consolidated model in the Hugging Face layout (`*.safetensors`, `config.json`,
    tokenizer files), loadable by transformers and vLLM as it is.
Everything is written to `step_N.tmp/` and renamed when complete, so a crash never
leaves a half checkpoint that looks whole; leftover `.tmp` directories are removed
at the next start.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ft.errors import CheckpointError

log = logging.getLogger("ft")

# One process saving without a process group is the intended single-GPU/CPU case.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")  # save and load

STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_SUBDIR = "trainer"
MODEL_FILE_PATTERNS = ("*.safetensors", "model.safetensors.index.json")


def step_dir_name(step: int) -> str:
    return f"step_{step}"


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


def has_trainer_state(step_dir: Path) -> bool:
    return (step_dir / TRAINER_SUBDIR / ".metadata").is_file() and (step_dir / TRAINER_SUBDIR / "extra.pt").is_file()


def has_model(step_dir: Path) -> bool:
    return any(step_dir.glob("*.safetensors"))


def resolve_model_checkpoint(checkpoint_dir: Path, name: str) -> Path:
    """`last_checkpoint` or `checkpoint_step_N` in a run's checkpoints dir -> the step directory."""
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


class CheckpointManager:
    """Saves, finds, loads and prunes the checkpoints of one run."""

    def __init__(
        self,
        checkpoint_dir: Path,
        *,
        is_main: bool,
        barrier: Callable[[], None],
        keep_last_n_checkpoints: int | None,
        keep_last_n_models: int | None,
    ) -> None:
        self.dir = checkpoint_dir
        self.is_main = is_main
        self.barrier = barrier
        self.keep_last_n_checkpoints = keep_last_n_checkpoints
        self.keep_last_n_models = keep_last_n_models

    def remove_incomplete(self) -> None:
        """Delete what an interrupted save left behind."""
        if self.is_main and self.dir.is_dir():
            for path in self.dir.glob("step_*.tmp"):
                log.warning("removing incomplete checkpoint %s", path)
                shutil.rmtree(path)
        self.barrier()

    def latest_resumable_step(self) -> int | None:
        steps = [step for step, path in list_step_dirs(self.dir).items() if has_trainer_state(path)]
        return max(steps) if steps else None

    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        extra: dict[str, Any],
        model_config: dict[str, Any],
        export_model: Callable[[Path], None],
    ) -> Path:
        """Write step_N atomically. `export_model(dir)` writes the HF-layout model (collective)."""
        final = self.dir / step_dir_name(step)
        tmp = self.dir / (step_dir_name(step) + ".tmp")
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / TRAINER_SUBDIR).mkdir(parents=True)
        self.barrier()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp / TRAINER_SUBDIR))
        export_model(tmp)
        if self.is_main:
            torch.save(extra, tmp / TRAINER_SUBDIR / "extra.pt")
            (tmp / TRAINER_SUBDIR / "model_config.json").write_text(json.dumps(model_config, indent=2))
            if final.exists():  # a re-save of the same step (e.g. final step after a periodic one)
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        self.barrier()
        return final

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
        self.check_model_config(step_dir, model_config)
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        try:
            dcp.load(state, checkpoint_id=str(step_dir / TRAINER_SUBDIR))
        except Exception as error:  # DCP raises a wide range of errors for mismatched state
            raise CheckpointError(f"cannot restore trainer state from {step_dir}: {error}") from error
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return torch.load(step_dir / TRAINER_SUBDIR / "extra.pt", weights_only=False)

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

    def _prune(self) -> None:
        steps = list_step_dirs(self.dir)
        with_state = [step for step, path in steps.items() if has_trainer_state(path)]
        with_model = [step for step, path in steps.items() if has_model(path)]
        if self.keep_last_n_checkpoints is not None:
            for step in with_state[: -self.keep_last_n_checkpoints or None]:
                shutil.rmtree(steps[step] / TRAINER_SUBDIR)
        if self.keep_last_n_models is not None:
            for step in with_model[: -self.keep_last_n_models or None]:
                for pattern in MODEL_FILE_PATTERNS:
                    for file in steps[step].glob(pattern):
                        file.unlink()
        for step, path in steps.items():
            if not has_trainer_state(path) and not has_model(path):
                shutil.rmtree(path)
