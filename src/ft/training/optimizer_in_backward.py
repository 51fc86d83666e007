"""`PerParameterOptimizer`: one inner optimizer per parameter, for the memory savers
that step parameters one at a time.

- `in_backward`: each parameter is stepped, and its gradient freed, by a
  post-accumulate-grad hook as soon as its gradient is ready, so at most a few
  gradients exist at once instead of all of them (Forgather, torchtune). Under
  FSDP2 the hook runs on the sharded parameter once its gradient is reduced.
  A global gradient-norm clip needs every gradient before the first step, so it
  is refused (`max_grad_norm=null`); the norm is still measured, from each
  gradient as it passes, and reported.
- `cpu_offload`: the optimizer state and a float32 master copy of each parameter
  live in host memory; the gradient goes to the host, the step runs there and the
  new value comes back. One process only (the host copies are plain tensors).
- `stochastic_rounding`: a bfloat16 parameter is stepped on a float32 copy and the
  result stochastically rounded back (`ft.training.stochastic_rounding`), so pure
  bf16 training keeps its small updates. The states of such a step are float32.

It is a `torch.optim.Optimizer`, so the LR scheduler and
`torch.distributed.checkpoint.state_dict` treat it as one optimizer: its param
groups hold one parameter each (the model's), `state` maps each parameter to its
inner optimizer's state (plus `master_weight`, the host copy, when offloading), and `load_state_dict` restores the states without casting them to
the parameter's dtype (which `Optimizer.load_state_dict` would do).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import Tensor

from ft.training.stochastic_rounding import rounding_generator, stochastic_round_into

MakeOptimizer = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
MASTER_WEIGHT = "master_weight"


def _local(tensor: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class _Slot:
    """One parameter's inner optimizer and the tensor it steps (the parameter, or its host copy)."""

    def __init__(self, index: int, inner: torch.optim.Optimizer, target: Tensor) -> None:
        self.index = index
        self.inner = inner
        self.target = target


class PerParameterOptimizer(torch.optim.Optimizer):
    def __init__(self, param_groups: list[dict[str, Any]], make: MakeOptimizer, *, in_backward: bool = False,
                 cpu_offload: bool = False, stochastic_rounding: bool = False, seed: int = 0) -> None:
        flat = [{**{k: v for k, v in group.items() if k != "params"}, "params": [param]}
                for group in param_groups for param in group["params"]]
        super().__init__(flat, defaults={})
        self.in_backward = in_backward
        self.cpu_offload = cpu_offload
        self.stochastic_rounding = stochastic_rounding
        self.seed = seed
        self._slots: dict[Tensor, _Slot] = {}
        self._grad_sq: dict[Any, Tensor] = {}
        self._hooks = []
        for index, group in enumerate(self.param_groups):
            (param,) = group["params"]
            target = param
            if cpu_offload:
                local = _local(param).detach()
                target = torch.empty(local.shape, dtype=torch.float32, device="cpu",
                                     pin_memory=local.is_cuda).copy_(local)
                target.requires_grad_(True)
            inner = make([{**self._hyper(group), "params": [target]}])
            for key, value in self._hyper(inner.param_groups[0]).items():  # lr, betas, ... for the scheduler
                group.setdefault(key, value)
            self._slots[param] = _Slot(index, inner, target)
            if in_backward:
                self._hooks.append(param.register_post_accumulate_grad_hook(_step_through(weakref.ref(self))))

    # -- stepping -------------------------------------------------------------------

    @staticmethod
    def _hyper(group: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in group.items() if k not in ("params", "initial_lr")}

    @torch.no_grad()
    def step(self, closure=None):
        """Steps the parameters that hold a gradient (in backward: none are left, the
        hooks stepped them all)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            param = group["params"][0]
            if param.grad is not None:
                self._step_param(param)
        return loss

    @torch.no_grad()
    def _step_param(self, param: Tensor) -> None:
        slot = self._slots[param]
        grad = param.grad
        if grad is None:
            return
        self._measure(grad)
        inner_group = slot.inner.param_groups[0]
        inner_group.update(self._hyper(self.param_groups[slot.index]))  # the scheduler sets lr on our groups
        if self.cpu_offload:
            slot.target.grad = _local(grad).to("cpu", torch.float32)
            slot.inner.step()
            slot.target.grad = None
            _local(param).copy_(slot.target, non_blocking=True)
        elif self.stochastic_rounding and param.dtype == torch.bfloat16:
            self._step_rounded(param, slot)
        else:
            slot.inner.step()
        param.grad = None

    def _step_rounded(self, param: Tensor, slot: _Slot) -> None:
        """The inner step on a float32 copy of the parameter, rounded back stochastically.

        Swapping `.data` keeps the parameter object (the state's key, FSDP's handle)
        and its storage; only the values are written back.
        """
        original, grad = param.data, param.grad
        param.grad = None
        param.data = original.float()
        param.grad = grad.float()
        slot.inner.step()
        updated = param.data
        param.grad = None
        param.data = original
        step = slot.inner.state.get(param, {}).get("step", 0)
        generator = rounding_generator(_local(updated).device, seed=self.seed, index=slot.index, step=int(step))
        stochastic_round_into(_local(original), _local(updated), generator=generator)

    def _measure(self, grad: Tensor) -> None:
        """Adds the gradient's squared norm to the step's total (grouped by DTensor layout,
        reduced in `grad_norm`)."""
        from torch.distributed.tensor import DTensor

        key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None
        # vector_norm accumulates in float32 without a float32 copy of the gradient
        # (for an 8B model's embedding that copy alone is 2 GiB).
        squared = torch.linalg.vector_norm(_local(grad).detach(), dtype=torch.float32).square()
        self._grad_sq[key] = self._grad_sq[key] + squared if key in self._grad_sq else squared

    def grad_norm(self) -> Tensor:
        """The global norm of the gradients stepped since the last call (on device)."""
        from torch.distributed.tensor import DTensor, Partial, Replicate

        total = None
        for key, squared in self._grad_sq.items():
            if key is not None:  # sum the shards' partial sums over the mesh dims they are sharded on
                mesh, placements = key
                partial = DTensor.from_local(squared, mesh, [Partial() if p.is_shard() else Replicate()
                                                             for p in placements])
                squared = partial.full_tensor()
            total = squared if total is None else total + squared.to(total.device)
        self._grad_sq = {}
        if total is None:
            param = self.param_groups[0]["params"][0] if self.param_groups else None
            return torch.zeros((), device=_local(param).device if param is not None else None)
        return total.sqrt()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            group["params"][0].grad = None

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # -- state ----------------------------------------------------------------------

    @property
    def state(self) -> dict[Tensor, dict[str, Any]]:  # type: ignore[override]
        merged = {}
        for param, slot in self._slots.items():
            inner_state = slot.inner.state.get(slot.target)
            if not inner_state:
                continue
            state = dict(inner_state)
            if self.cpu_offload:
                # Saved even for float32 parameters: DCP's loader may step a fresh optimizer
                # (lr 0) after loading the model, which writes the old host copy back.
                state[MASTER_WEIGHT] = slot.target.detach()
            merged[param] = state
        return merged

    @state.setter
    def state(self, value) -> None:
        # Optimizer.__init__ assigns an empty state; ours lives in the inner optimizers.
        if value:
            raise AttributeError("PerParameterOptimizer.state is read-only; use load_state_dict")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(saved_groups)} parameter groups, this optimizer "
                             f"{len(self.param_groups)} (one per parameter)")
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
            param = group["params"][0]
            slot = self._slots[param]
            saved_state = state_dict["state"].get(saved["params"][0])
            if saved_state is None:
                continue
            saved_state = dict(saved_state)
            master = saved_state.pop(MASTER_WEIGHT, None)
            if master is not None:
                slot.target.detach().copy_(master)
                _local(param).detach().copy_(slot.target)
            elif self.cpu_offload:
                slot.target.detach().copy_(_local(param))
            device = _local(slot.target).device
            restored = {}
            for key, value in saved_state.items():
                if isinstance(value, Tensor) and value.dim() > 0 and _local(value).device != device:
                    value = value.to(device)
                restored[key] = value
            slot.inner.state[slot.target] = restored


def _step_through(optimizer_ref: "weakref.ref[PerParameterOptimizer]") -> Callable[[Tensor], None]:
    """The backward hook, holding the optimizer weakly: a hook lives in the parameter's C++
    side, where the garbage collector cannot see the cycle parameter -> hook ->
    optimizer -> parameter, so a strong reference would keep the model's memory alive
    after both are dropped."""
    def step_param(param: Tensor) -> None:
        optimizer = optimizer_ref()
        if optimizer is not None:
            optimizer._step_param(param)

    return step_param

