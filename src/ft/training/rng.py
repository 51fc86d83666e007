"""The random-number state a resumed run needs to continue exactly (dropout, sampling)."""

from __future__ import annotations

from typing import Any

import torch


def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any] | None, device: torch.device) -> None:
    if not state:
        return
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
