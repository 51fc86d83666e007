"""`Command`: one CLI verb (help line, argparse setup, handler).

Modules that define verbs import `Command` from here, never from `ft.cli`, which
imports them in turn (in `ft.cli.verbs.register_commands`). This module imports
only `ft.registry`, so it can never be part of an import cycle.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from ft.registry import Registry


@dataclass(frozen=True)
class Command:
    """One CLI verb: its help line, its argparse setup and its handler."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


@dataclass(frozen=True)
class CommandGroup:
    """`ft GROUP`: its help line and its verbs (`ft GROUP VERB`)."""

    help: str
    commands: Registry[Command]
