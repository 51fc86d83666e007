"""The console side of training: a rich progress bar and the metric lines above it."""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger("ft")


class TrainingProgress:
    """A step progress bar on the main rank; a no-op elsewhere."""

    def __init__(self, *, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        self.console = Console(file=sys.stderr)
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
        )
        self.task = self.progress.add_task("train", total=total, completed=start)

    def __enter__(self) -> TrainingProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def advance(self, step: int) -> None:
        self.progress.update(self.task, completed=step)

    def log(self, line: str) -> None:
        """A metric line: printed above the bar, and written to the run's log files."""
        if self.enabled:
            self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        # The file handlers get it too; keep it off the console a second time.
        for handler in logging.getLogger("ft").handlers:
            handler.handle(log.makeRecord("ft", logging.INFO, __file__, 0, line, None, None))
