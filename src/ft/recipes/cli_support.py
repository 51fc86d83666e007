"""Turns a recipe (config dataclass + run function) into an `ft` CLI command.

Every recipe gets the same surface: `OUT`, `--preset NAME`, `--list-presets`,
`--config-file` (repeatable), `--config key=value ...`, `--dump-config
[--explain]`, `--no-sweep-dir`; its `--help` lists the config keys. It also owns the
output directory: the sweep subdirectory named after the config's hash, and
`OUT/config.yaml` (written by rank 0 only).

A recipe names its run function as "module:function", imported when the command
runs: building the parser (and `--help`) imports the config class, never torch.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ft.cli.command import Command
from ft.config import build_config, config_hash
from ft.errors import ConfigError, FtError


def recipe_command(
    *, help: str, config_class: type, run: str, sweep_prefix: str, recipe: str | None = None,
    dry_run: str | None = None,
) -> Command:
    """A Command that builds `config_class` from the CLI and calls `run(config, output_dir)`.

    `run` and `dry_run` are "module:function" paths. `dry_run(config)` answers
    `--dry-run` (print the plan, build nothing on a GPU); a recipe without one
    refuses the flag.

    `recipe` names the preset folder (`ft/recipes/presets/<recipe>/`); default: the
    name of the module that defines `run`.
    """
    recipe = recipe or run.partition(":")[0].rsplit(".", 1)[-1]

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_recipe_arguments(parser)
        from ft.recipes.config_help import format_keys_help

        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = format_keys_help(config_class)

    def run_command(args: argparse.Namespace) -> int | None:
        from ft.recipes.presets import format_preset_list

        if args.list_presets:
            print(format_preset_list(recipe), end="")
            return 0
        config, origins = build_recipe_config(config_class, args, recipe=recipe)
        if args.dump_config:
            from ft.recipes.config_help import annotated_dump

            print(annotated_dump(config, origins, explain=args.explain), end="")
            return 0
        if args.dry_run:
            if dry_run is None:
                raise ConfigError(f"--dry-run is not available for {recipe} yet")
            return load_function(dry_run)(config)
        if args.output_dir is None:
            raise ConfigError("OUT is required: the directory for checkpoints, metrics and logs")
        with run_directory(Path(args.output_dir), config, sweep=not args.no_sweep_dir, sweep_prefix=sweep_prefix,
                           config_files=args.config_file or []) as output_dir:
            logging.getLogger("ft").info("run directory: %s", output_dir)
            return load_function(run)(config, output_dir)

    return Command(help=help, add_arguments=add_arguments, run=run_command)


def load_function(path: str) -> Callable[..., Any]:
    """The function a "module:function" path names, its module imported now."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def build_recipe_config(config_class: type, args: argparse.Namespace, *, recipe: str) -> tuple[Any, dict[str, str]]:
    """The config the CLI arguments give (defaults -> preset -> files -> --config) and
    where each set value came from."""
    from ft.config import _read_config_file, config_to_dict, parse_override
    from ft.recipes.config_help import value_origins
    from ft.recipes.presets import get_preset

    preset = get_preset(recipe, args.preset) if args.preset else None
    files = [str(f) for f in (args.config_file or [])]
    overrides = [item for group in (args.config or []) for item in group]
    config = build_config(config_class, config_files=([str(preset.file)] if preset else []) + files,
                          overrides=overrides)
    origins = value_origins(
        config_to_dict(config_class()), preset=(preset.name, preset.values()) if preset else None,
        config_files=[(f, _read_config_file(Path(f))) for f in files],
        overrides=[parse_override(o) for o in overrides],
    )
    return config, origins


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", metavar="OUT", nargs="?", help="directory for checkpoints, metrics and logs")
    parser.add_argument("--preset", metavar="NAME",
                        help="start from a shipped preset (--list-presets); --config-file and --config override it")
    parser.add_argument("--list-presets", action="store_true", help="list the presets with a line each and exit")
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
    parser.add_argument("--dump-config", action="store_true",
                        help="print the effective config as YAML, each value marked with where it came from "
                             "(default, preset, file, command line), and exit")
    parser.add_argument("--explain", action="store_true", help="with --dump-config: a description above each key")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (parameters, tokens and steps per epoch, predicted peak GPU memory by "
                             "component, whether it fits max_memory_gib) and exit; builds nothing on a GPU")
    parser.add_argument(
        "--no-sweep-dir",
        action="store_true",
        help="write into OUT itself instead of a subdirectory named after the config's hash",
    )


def sweep_dir_name(config: Any, *, prefix: str) -> str:
    return f"{prefix}_{config_hash(config)}"


@contextlib.contextmanager
def run_directory(out: Path, config: Any, *, sweep: bool, sweep_prefix: str,
                  config_files: Sequence[str | Path] = ()) -> Iterator[Path]:
    """The run's directory, locked by the main process (one run per directory) before
    anything is written there, with the effective config in it; the lock is released
    on leaving (or by the kernel, however the process ends)."""
    from ft.gang import detect_launch
    from ft.training.run_lock import lock_output_dir

    output_dir = out / sweep_dir_name(config, prefix=sweep_prefix) if sweep else out
    lock = lock_output_dir(output_dir) if detect_launch().rank == 0 else None
    try:
        yield prepare_output_dir(out, config, sweep=sweep, sweep_prefix=sweep_prefix, config_files=config_files)
    finally:
        if lock is not None:
            lock.release()


def prepare_output_dir(out: Path, config: Any, *, sweep: bool, sweep_prefix: str,
                       config_files: Sequence[str | Path] = ()) -> Path:
    """Create the run's directory and write the effective config into it (`ft.recipes.run_config`)."""
    from ft.gang import detect_launch
    from ft.recipes.run_config import write_run_config

    output_dir = out / sweep_dir_name(config, prefix=sweep_prefix) if sweep else out
    if output_dir.exists() and not output_dir.is_dir():
        raise FtError(f"output path {output_dir} exists and is not a directory")
    output_dir.mkdir(parents=True, exist_ok=True)
    # Called before any process group exists, so the launch environment says who is
    # rank 0; only it writes (other ranks would race on the same file).
    if detect_launch().rank == 0:
        write_run_config(output_dir, config, config_files=config_files)
    return output_dir
