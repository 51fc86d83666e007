"""The `ft` command line: `main` parses `ft GROUP VERB ...` and runs the verb.

The verbs are registered in `ft.cli.verbs`; `Command` lives in `ft.cli.command`.
This module imports neither the verb modules nor anything heavy at import time,
so `from ft.cli import Command` works from any module without a cycle.
`python -m ft` and the `ft` script both call `main`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from ft.cli.command import Command, CommandGroup
from ft.cli.verbs import command_groups, registered_commands
from ft.errors import FtError

log = logging.getLogger("ft")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ft", description="Fine-tune large language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    groups = parser.add_subparsers(dest="group", metavar="GROUP")
    for group_name, group in command_groups().items():
        group_parser = groups.add_parser(group_name, help=group.help, description=group.help)
        commands = group_parser.add_subparsers(dest="command", metavar="COMMAND")
        for name, command in group.commands.items():
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



__all__ = ["Command", "CommandGroup", "build_parser", "main", "registered_commands"]
