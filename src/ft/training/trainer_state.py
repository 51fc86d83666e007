"""`TrainerState`: what a checkpoint holds besides the model and optimizer, so that a
resumed run continues exactly (same lr, same batches, same loss scale, same RNG)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ft.training.rng import restore_rng, rng_state


@dataclass
class TrainerState:
    step: int
    scheduler: Any
    reader: Any
    scaler: torch.amp.GradScaler

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "scheduler": self.scheduler.state_dict(), "reader": self.reader.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.step = state["step"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.reader.load_state_dict(state["reader"])
        self.scaler.load_state_dict(state["scaler"])
        restore_rng(state.get("rng"), device)
