"""`StopSignal`: SIGTERM / SIGINT ask a training loop to finish its step, save and exit."""

from __future__ import annotations

import logging
import signal
from typing import Any

import torch

from ft.gang import Gangs

log = logging.getLogger("ft")


class StopSignal:
    """Within `with StopSignal() as stop:`, SIGTERM / SIGINT set a flag that
    `stop.requested(gangs)` reports on every rank at the same step; a second signal
    stops at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.flag = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.flag:  # a second signal: stop now
            raise KeyboardInterrupt
        log.warning("received signal %d: finishing the step, then saving a checkpoint", signum)
        self.flag = True

    def requested(self, gangs: Gangs) -> bool:
        if gangs.root.size == 1:
            return self.flag
        # A host tensor (gloo serves it on GPU runs too): no device sync per step.
        flag = torch.tensor(int(self.flag))
        gangs.root.all_reduce(flag, op="max")  # every rank must stop at the same step
        return bool(flag.item())
