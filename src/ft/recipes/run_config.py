"""`OUT/config.yaml`: the record of a run's effective config, and the checks that
keep it true.

ft writes the config a run uses into `OUT/config.yaml` (atomically, main process
only, under the run lock), except where that would destroy something or make the
record lie:

- a `config.yaml` that holds keys this recipe does not know belongs to another
  recipe's run (`ft lm generate` into a training OUT) or to another tool: it is
  left alone and the run stops;
- a `config.yaml` that is also one of the run's `--config-file` inputs is never
  rewritten with different content;
- when OUT holds trainer state to resume, every key of the config class's
  `FIXED_ON_RESUME` must equal the recorded value: the saved optimizer, schedule,
  data position and grad scaler depend on them, so a new value would be recorded
  here but not used.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from ft.config import _read_config_file, config_to_dict, dump_config, short_repr
from ft.errors import ConfigError, OutputDirError
from ft.training.checkpoint import has_trainer_state, list_step_dirs
from ft.training.run_lock import output_dir_error

CONFIG_NAME = "config.yaml"


def write_run_config(output_dir: Path, config: Any, *, config_files: Sequence[str | Path] = ()) -> None:
    """Write `config` to OUT/config.yaml after the checks in the module docstring."""
    path = output_dir / CONFIG_NAME
    text = dump_config(config)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OutputDirError(f"{path} is not a regular file; ft records the run's config there: "
                             "remove it or use another output directory")
    if path.is_file():
        if path.read_bytes() == text.encode():
            return  # the same config: nothing to write
        previous = _read_config_file(path)
        _check_owner(path, previous, config)
        _check_not_an_input(path, config_files)
        _check_resume(output_dir, path, previous, config)
    tmp = output_dir / f".{CONFIG_NAME}.{os.getpid()}.tmp"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise output_dir_error(output_dir, error, f"write {CONFIG_NAME}") from None


def _check_owner(path: Path, previous: dict[str, Any], config: Any) -> None:
    ours = set(config_to_dict(config))
    foreign = sorted(str(key) for key in previous if str(key) not in ours)
    if foreign:
        raise OutputDirError(
            f"{path} is not a config of this command (it has {', '.join(map(short_repr, foreign[:3]))}"
            f"{' ...' if len(foreign) > 3 else ''}): it belongs to another run or tool and ft does not overwrite it; "
            "use another output directory"
        )


def _check_not_an_input(path: Path, config_files: Sequence[str | Path]) -> None:
    for file in config_files:
        try:
            same = Path(file).samefile(path)
        except OSError:
            continue
        if same:
            raise ConfigError(
                f"--config-file {file} is this run's own {CONFIG_NAME}, which ft rewrites with the effective "
                f"config; copy it out of {path.parent} and pass the copy to change settings"
            )


def _check_resume(output_dir: Path, path: Path, previous: dict[str, Any], config: Any) -> None:
    fixed = getattr(type(config), "FIXED_ON_RESUME", ())
    steps = list_step_dirs(output_dir / "checkpoints")
    if not fixed or not any(has_trainer_state(step_dir) for step_dir in steps.values()):
        return
    current = config_to_dict(config)
    changed = [key for key in fixed if key in previous and not _same(previous[key], current[key])]
    if not changed:
        return
    was = ", ".join(f"{key}={short_repr(previous[key])}" for key in changed)
    now = ", ".join(f"{key}={short_repr(current[key])}" for key in changed)
    raise ConfigError(
        f"cannot resume {output_dir} with {now}: its checkpoints were made with {was} ({path}), and the saved "
        "optimizer, schedule, data position and precision depend on it; resume with the recorded value, or start "
        f"a new run from these weights in another directory (resume_checkpoint_dir={output_dir / 'checkpoints'} "
        "model=last_checkpoint)"
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b) or (math.isnan(float(a)) and math.isnan(float(b)))
    if isinstance(a, str) and isinstance(b, numbers) or isinstance(b, str) and isinstance(a, numbers):
        try:  # YAML 1.1 reads 5e-6 as a string
            return float(a) == float(b)
        except ValueError:
            return False
    return a == b
