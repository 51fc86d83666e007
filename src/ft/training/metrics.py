"""Publishing training metrics: OUT/metrics/*.jsonl always, TensorBoard and W&B on request.

Only the main rank publishes. Each recorder gets `record(split, step, values)`;
the console line and progress bar live in the recipe. Recorders are registered
by name (`metric_recorders=[...]`) in `METRIC_RECORDERS`, by `register_metric_recorders`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from ft.errors import ConfigError
from ft.registry import Registry

log = logging.getLogger("ft")

# Dense bf16 peak TFLOP/s of known accelerators, for MFU. Spec sheet numbers
# (no sparsity); the MFU line states which one was used.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
}


def device_peak_tflops(device: torch.device, override: float | None = None) -> tuple[float | None, str]:
    """The peak used for MFU and where it came from."""
    if override is not None:
        return override, "peak_tflops from the config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS.items():
            if key in name:
                return tflops, f"{name} bf16 dense spec"
        return None, f"unknown GPU {name!r}: set peak_tflops for MFU"
    return None, "CPU: no MFU (set peak_tflops to report one)"


class MetricRecorder(Protocol):
    def record(self, split: str, step: int, values: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlRecorder:
    """One JSON object per published step in OUT/metrics/{split}.jsonl.

    A run resumed at `start_step` first drops the lines of later steps, which the
    interrupted run published after its last checkpoint and the resumed run will
    publish again: each step appears once, from the run whose weights survived.
    """

    def __init__(self, output_dir: Path, *, start_step: int = 0) -> None:
        self.dir = output_dir / "metrics"
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in self.dir.glob("*.jsonl"):
            lines = path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if _step_of(line) <= start_step]
            if len(kept) != len(lines):
                tmp = path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(kept))
                os.replace(tmp, path)

    def record(self, split: str, step: int, values: dict[str, Any]) -> None:
        with open(self.dir / f"{split}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def close(self) -> None:
        pass


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1  # a torn last line of a killed run: keep it out of the way, never crash on it


class TensorBoardRecorder:
    def __init__(self, output_dir: Path, *, start_step: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "metric_recorders lists 'tensorboard' but it is not installed: pip install 'ft[tensorboard]'"
            ) from None
        self.writers: dict[str, Any] = {}
        self.root = output_dir / "tb"
        self._writer_class = SummaryWriter
        self.start_step = start_step

    def record(self, split: str, step: int, values: dict[str, Any]) -> None:
        if split not in self.writers:
            # purge_step hides events of steps after the checkpoint a resumed run started from.
            purge = self.start_step + 1 if self.start_step else None
            self.writers[split] = self._writer_class(str(self.root / split), purge_step=purge)
        writer = self.writers[split]
        for key, value in values.items():
            if isinstance(value, (int, float)):
                writer.add_scalar(key, value, step)
        writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


class WandbRecorder:
    """Weights & Biases; set WANDB_MODE=offline to run without a network."""

    def __init__(self, output_dir: Path, *, project: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("metric_recorders lists 'wandb' but it is not installed: pip install 'ft[wandb]'") from None
        os.environ.setdefault("WANDB_DIR", str(output_dir))
        self.run = wandb.init(project=project, dir=str(output_dir), config=config, name=output_dir.name, resume="allow")

    def record(self, split: str, step: int, values: dict[str, Any]) -> None:
        self.run.log({f"{split}/{key}": value for key, value in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


# Builds a recorder for OUT: (output_dir, start_step=, wandb_project=, config=) -> recorder.
RecorderFactory = Callable[..., MetricRecorder]


def _jsonl(output_dir: Path, *, start_step: int, **_: Any) -> MetricRecorder:
    return JsonlRecorder(output_dir, start_step=start_step)


def _tensorboard(output_dir: Path, *, start_step: int, **_: Any) -> MetricRecorder:
    return TensorBoardRecorder(output_dir, start_step=start_step)


def _wandb(output_dir: Path, *, wandb_project: str, config: dict[str, Any], **_: Any) -> MetricRecorder:
    return WandbRecorder(output_dir, project=wandb_project, config=config)


def register_metric_recorders(recorders: Registry[RecorderFactory]) -> None:
    recorders.register("jsonl", _jsonl)
    recorders.register("tensorboard", _tensorboard)
    recorders.register("wandb", _wandb)


METRIC_RECORDERS: Registry[RecorderFactory] = Registry("metric recorder")
register_metric_recorders(METRIC_RECORDERS)

# On in every run, whatever `metric_recorders` lists: OUT/metrics/*.jsonl always exists.
ALWAYS_ON = "jsonl"


def check_recorder_names(names: list[str], *, key: str = "metric_recorders") -> None:
    """A ConfigError naming config key `key` for the first unregistered name."""
    for name in names:
        METRIC_RECORDERS.get(name, key=key)


class MetricBag:
    """All recorders of a run; `jsonl` is always on."""

    def __init__(
        self, output_dir: Path, names: list[str], *, wandb_project: str, config: dict[str, Any], start_step: int = 0
    ) -> None:
        check_recorder_names(names)
        ordered = dict.fromkeys([ALWAYS_ON, *names])  # each once, in the order given
        self.recorders: list[MetricRecorder] = [
            METRIC_RECORDERS.get(name)(output_dir, start_step=start_step, wandb_project=wandb_project, config=config)
            for name in ordered
        ]

    def record(self, split: str, step: int, values: dict[str, Any]) -> None:
        for recorder in self.recorders:
            recorder.record(split, step, values)

    def close(self) -> None:
        for recorder in self.recorders:
            recorder.close()


def format_metrics(values: dict[str, Any]) -> str:
    """The console line: short names, readable precision."""
    parts = []
    for key, value in values.items():
        if isinstance(value, float):
            text = f"{value:.3e}" if (abs(value) < 1e-3 and value != 0) or abs(value) >= 1e6 else f"{value:.4g}"
        else:
            text = str(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)
