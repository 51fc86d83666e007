"""Turns a recipe (config dataclass + run function) into an `ft` CLI command.

Every recipe gets the same surface: `OUT`, `--config-file` (repeatable),
`--config key=value ...`, `--dump-config`, `--no-sweep-dir`. It also owns the
output directory: the sweep subdirectory named after the config's hash, and
`OUT/config.yaml` (written by rank 0 only).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable

from ft.cli.command import Command
from ft.config import build_config, config_hash, dump_config
from ft.errors import FtError
from ft.gang import detect_launch

RecipeRun = Callable[[Any, Path], int | None]


def recipe_command(*, help: str, config_class: type, run: RecipeRun, sweep_prefix: str) -> Command:
    """A Command that builds `config_class` from the CLI and calls `run(config, output_dir)`."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_recipe_arguments(parser)

    def run_command(args: argparse.Namespace) -> int | None:
        config = build_config(
            config_class,
            config_files=args.config_file or [],
            overrides=[item for group in (args.config or []) for item in group],
        )
        if args.dump_config:
            print(dump_config(config), end="")
            return 0
        output_dir = prepare_output_dir(
            Path(args.output_dir), config, sweep=not args.no_sweep_dir, sweep_prefix=sweep_prefix
        )
        return run(config, output_dir)

    return Command(help=help, add_arguments=add_arguments, run=run_command)


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", metavar="OUT", help="directory for checkpoints, metrics and logs")
    parser.add_argument(
        "--config-file",
        action="append",
        metavar="FILE",
        help="YAML config file; repeatable, later files override earlier ones",
    )
    parser.add_argument(
        "--config",
        action="append",
        nargs="+",
        metavar="KEY=VALUE",
        help="config overrides, values parsed as YAML; dotted keys reach sections (a.b=1)",
    )
    parser.add_argument("--dump-config", action="store_true", help="print the effective config as YAML and exit")
    parser.add_argument(
        "--no-sweep-dir",
        action="store_true",
        help="write into OUT itself instead of a subdirectory named after the config's hash",
    )


def sweep_dir_name(config: Any, *, prefix: str) -> str:
    return f"{prefix}_{config_hash(config)}"


def prepare_output_dir(out: Path, config: Any, *, sweep: bool, sweep_prefix: str) -> Path:
    """Create the run's directory and write the effective config into it."""
    output_dir = out / sweep_dir_name(config, prefix=sweep_prefix) if sweep else out
    if output_dir.exists() and not output_dir.is_dir():
        raise FtError(f"output path {output_dir} exists and is not a directory")
    output_dir.mkdir(parents=True, exist_ok=True)
    # Called before any process group exists, so the launch environment says who is
    # rank 0; only it writes (other ranks would race on the same file). The write is
    # atomic so a reader never sees half a config.
    if detect_launch().rank == 0:
        tmp = output_dir / f".config.yaml.{os.getpid()}.tmp"
        tmp.write_text(dump_config(config))
        os.replace(tmp, output_dir / "config.yaml")
    return output_dir
