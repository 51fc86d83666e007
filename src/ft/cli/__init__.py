"""The `ft` command line: a registry of `group command` -> Command, and `main`.

Every command is registered in `_register_commands()`, one `register(...)` line
each, so the full CLI surface is visible in one place.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from ft.errors import FtError

log = logging.getLogger("ft")


@dataclass(frozen=True)
class Command:
    """One CLI verb: its help line, its argparse setup and its handler."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


GROUP_HELP = {
    "lm": "language model recipes (fine-tuning, generation)",
    "llama": "Llama model family utilities",
    "assets": "list and inspect asset cards",
}

_COMMANDS: dict[str, dict[str, Command]] = {}


def register(group: str, name: str, command: Command) -> None:
    """Add `ft GROUP NAME`. Registering the same verb twice is a bug."""
    if group not in GROUP_HELP:
        raise ValueError(f"unknown command group {group!r}; known: {sorted(GROUP_HELP)}")
    commands = _COMMANDS.setdefault(group, {})
    if name in commands:
        raise ValueError(f"`ft {group} {name}` is already registered")
    commands[name] = command


def registered_commands() -> dict[str, list[str]]:
    """The CLI surface as {group: [command, ...]} (frozen by a test)."""
    _ensure_registered()
    return {group: sorted(_COMMANDS.get(group, {})) for group in GROUP_HELP}


def _register_commands() -> None:
    from ft.assets.cli import LIST_COMMAND, SHOW_COMMAND
    from ft.models.llama.cli import WRITE_HF_CONFIG_COMMAND
    from ft.recipes.generate import GENERATE_COMMAND
    from ft.recipes.instruction_finetune import INSTRUCTION_FINETUNE_COMMAND

    register("lm", "instruction_finetune", INSTRUCTION_FINETUNE_COMMAND)
    register("lm", "generate", GENERATE_COMMAND)
    register("llama", "write_hf_config", WRITE_HF_CONFIG_COMMAND)
    register("assets", "list", LIST_COMMAND)
    register("assets", "show", SHOW_COMMAND)


def _ensure_registered() -> None:
    if not _COMMANDS:
        _register_commands()


def build_parser() -> argparse.ArgumentParser:
    _ensure_registered()
    parser = argparse.ArgumentParser(prog="ft", description="Fine-tune large language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    groups = parser.add_subparsers(dest="group", metavar="GROUP")
    for group, group_help in GROUP_HELP.items():
        group_parser = groups.add_parser(group, help=group_help, description=group_help)
        commands = group_parser.add_subparsers(dest="command", metavar="COMMAND")
        for name, command in sorted(_COMMANDS.get(group, {}).items()):
            command_parser = commands.add_parser(name, help=command.help, description=command.help)
            command_parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
            command.add_arguments(command_parser)
            command_parser.set_defaults(_command=command)
        group_parser.set_defaults(_group_parser=group_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.group is None:
        parser.print_help()
        return 0
    command = getattr(args, "_command", None)
    if command is None:
        args._group_parser.print_help()
        return 0
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        code = command.run(args) or 0
        _exit_now_if_distributed(code)
        return code
    except FtError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:
        # Output piped into `head` and the like: the reader left; not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _exit_now_if_distributed(code: int) -> None:
    """End a process that ran a process group without interpreter finalization.

    Under load, gloo's threads occasionally abort the C++ static destructors of a
    process whose work is complete ("terminate called without an active exception"),
    which would turn a finished multi-process run into a failed one. Everything the
    run wrote is closed by now; flush what is buffered and leave.
    """
    from ft.gang import process_group_was_used

    if process_group_was_used():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
