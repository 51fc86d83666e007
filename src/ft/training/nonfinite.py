"""Non-finite loss or gradient norm: found without a per-step device sync, never saved.

`NonFiniteGuard` folds each step's loss and gradient norm into a flag that stays on
the device (no host sync per step). The loop calls `check` at each metrics publish
and before every save: one sync and one tiny collective, so all ranks agree.

`nonfinite_policy` (a recipe config key):

- `stop`: the first check that sees a non-finite value stops the run with one line
  before anything is saved. The weights in memory may already be damaged, but the
  newest checkpoint on disk is the last good state and nothing prunes it.
- `skip_step`: a step whose loss or gradient norm is non-finite makes no update:
  the optimizer step is skipped and its gradients dropped, as large-scale trainers
  (and GradScaler) do; the schedule still advances, so the learning rate follows
  the step number. Deciding this costs one host sync per step.

With a float16 grad scaler, non-finite gradients are the scaler's business (it skips
the step and lowers the scale); only the loss is checked then.
"""

from __future__ import annotations

import logging
from typing import Callable, Literal

import torch

from ft.errors import NonFiniteError
from ft.gang import Gangs
from ft.training.step_stats import StepStats

log = logging.getLogger("ft")

NonFinitePolicy = Literal["stop", "skip_step"]


class NonFiniteGuard:
    def __init__(self, policy: NonFinitePolicy, *, gangs: Gangs, check_grad_norm: bool, start_step: int = 0) -> None:
        self.policy = policy
        self.gangs = gangs
        self.check_grad_norm = check_grad_norm
        self.finite = torch.ones((), dtype=torch.bool, device=gangs.device)
        self.last_good_step = start_step  # the newest step known finite (a check, or the resumed state)
        self.skipped_steps = 0
        self._before: tuple[torch.Tensor, int] | None = None
        self._skipped = False

    def begin_step(self, stats: StepStats) -> None:
        """Remember the sums before a step, so a skipped step leaves no trace in the loss."""
        if self.policy == "skip_step":
            self._before = (stats.loss_sum.clone(), stats.targets)

    def skip_if(self, step_loss: torch.Tensor, step: int) -> Callable[[torch.Tensor], bool] | None:
        """For `optimizer_step(skip_if=...)`: under skip_step, whether this step must make no update."""
        if self.policy != "skip_step":
            return None

        def skip(grad_norm: torch.Tensor) -> bool:
            bad = ~torch.isfinite(step_loss)
            if self.check_grad_norm:
                bad = bad | ~torch.isfinite(grad_norm)
            flag = bad.to(torch.int32)
            self.gangs.root.all_reduce(flag, op="max")  # every rank skips the same steps
            self._skipped = bool(flag.item())
            if not self._skipped:
                return False
            self.skipped_steps += 1
            log.warning("step %d: non-finite loss or gradient norm (%s); skipping the update (%d skipped so far)",
                        step, float(grad_norm), self.skipped_steps)
            return True

        return skip

    def end_step(self, stats: StepStats, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Fold the step into the flag (stop), or take a skipped step out of `stats` (skip_step)."""
        if self.policy == "skip_step":
            if self._skipped and self._before is not None:
                stats.loss_sum, stats.targets = self._before
            self._before, self._skipped = None, False
            return
        self.finite &= torch.isfinite(step_loss)
        if self.check_grad_norm:
            self.finite &= torch.isfinite(grad_norm)

    def check(self, step: int, *, newest_checkpoint: str | None, learning_rate: float) -> None:
        """Raise NonFiniteError (on every rank) if any step since the last check was non-finite."""
        if self.policy != "stop":
            return
        flag = (~self.finite).to(torch.int32)
        self.gangs.root.all_reduce(flag, op="max")
        if not flag.item():
            self.last_good_step = step
            return
        where = f"at step {step}" if step == self.last_good_step + 1 else \
            f"between step {self.last_good_step + 1} and step {step}"
        kept = f"the newest checkpoint, {newest_checkpoint}, is the last good state" if newest_checkpoint \
            else "no checkpoint was saved"
        raise NonFiniteError(
            f"the loss or gradient norm became non-finite (nan or inf) {where}; nothing was saved, {kept}; "
            f"lower learning_rate (now {learning_rate:g}) or set nonfinite_policy=skip_step to skip such steps"
        )
