"""The training step of a pipeline-parallel run (`pipeline_parallel_size > 1`).

`PipelineRunner` replaces `accumulate_gradients` and `validate` of `ft.training.step`
for a `ft.models.pipeline.PipelineRankModel`:

- `step(batches)`: the step's micro-batches (the same on every rank of a pipeline:
  they share a dp rank) go through torch's schedule as its micro-batches; the last
  stage's loss is the chunked next-token cross-entropy summed over target tokens and
  divided by the step's target tokens over all dp ranks (times dp size, as FSDP/DDP
  average), exactly as `accumulate_gradients` normalises, with `scale_grads=False`.
  A tied embedding's gradient is summed over the first and last stage; the step's
  loss is broadcast from the last stage so every rank publishes it;
- `clip_grad_norm`: the norm over every stage (the tied weight counted once);
- `validate`: forward only, stage to stage by point-to-point sends;
- `export`: each stage's dp/tp rank 0 gathers its tensors, global rank 0 writes the
  whole HF model (`gather_from_stages` also brings a LoRA run's adapters together).

Micro-batches of one step are padded to one shape (packed rows already share it);
a new shape builds the schedule again (torch sizes its receive buffers once).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ft.data.packing import Batch
from ft.gang import Gangs
from ft.models.pipeline import SCHEDULES, PipelineRankModel, schedule_class
from ft.training.loss import chunked_cross_entropy_sum, target_positions
from ft.training.optim import clip_grad_norm
from ft.training.step_stats import StepStats

IGNORE_INDEX = -100


def pad_batches(batches: Sequence[Batch]) -> list[Batch]:
    """The micro-batches padded to their largest [B, T] (padding rows and columns carry no targets)."""
    B = max(b.tokens_BT.shape[0] for b in batches)
    T = max(b.tokens_BT.shape[1] for b in batches)

    def pad(t: Tensor, value: int) -> Tensor:
        b, s = t.shape
        if (b, s) == (B, T):
            return t
        out = torch.full((B, T), value, dtype=t.dtype)
        out[:b, :s] = t
        return out

    return [Batch(tokens_BT=pad(b.tokens_BT, 0), labels_BT=pad(b.labels_BT, IGNORE_INDEX),
                  positions_BT=pad(b.positions_BT, 0), document_ids_BT=pad(b.document_ids_BT, -1),
                  num_target_tokens=b.num_target_tokens, num_tokens=b.num_tokens, num_examples=b.num_examples)
            for b in batches]


class PipelineRunner:
    """Runs `model`'s stages under `schedule` with `micro_batches` micro-batches per step."""

    def __init__(self, model: PipelineRankModel, gangs: Gangs, *, schedule: str, micro_batches: int,
                 loss_chunk_size: int, scaler: Any = None) -> None:
        self.model, self.gangs = model, gangs
        self.schedule_name, self.micro_batches = schedule, micro_batches
        self.loss_chunk_size = loss_chunk_size
        self.scaler = scaler
        self.n_stages = model.pp_size * SCHEDULES[schedule][1]
        self.last_rank = (self.n_stages - 1) % model.pp_size
        self._schedule: Any = None
        self._shape: tuple[int, ...] | None = None
        self._losses: list[Tensor] = []
        self._norm = 1.0
        self._tied_group = self._make_tied_group()

    # -- setup

    def _make_tied_group(self) -> Any:
        """The group of the first and last stage's ranks at this rank's (dp, tp) place."""
        if self.model.pp_size == 1 or not self.model.config.tie_embeddings:
            return None
        ranks_PX = self.gangs.mesh.mesh.reshape(self.model.pp_size, -1)
        mine = None
        for col in range(ranks_PX.shape[1]):  # every rank creates every group, in the same order
            pair = [int(ranks_PX[0, col]), int(ranks_PX[-1, col])]
            group = dist.new_group(pair)
            if dist.get_rank() in pair:
                mine = group
        return mine

    def _build(self, shape: tuple[int, ...]) -> Any:
        from torch.distributed.pipelining import PipelineStage

        stages = [PipelineStage(view, view.stage_index, self.n_stages, self.gangs.device, group=self.gangs.pp.group)
                  for view in self.model.stages]
        cls = schedule_class(self.schedule_name)
        if SCHEDULES[self.schedule_name][1] == 1:
            return cls(stages[0], self.micro_batches, loss_fn=self._loss, scale_grads=False)
        return cls(stages, self.micro_batches, loss_fn=self._loss, scale_grads=False)

    def _loss(self, hidden_BTD: Tensor, labels_BT: Tensor) -> Tensor:
        """Summed cross-entropy of one micro-batch, normalised for the whole step."""
        last = next(view for view in self.model.stages if view.is_last)
        labels_BT = labels_BT.cpu()
        target_index_N = target_positions(labels_BT).to(hidden_BTD.device, non_blocking=True)
        loss_sum = chunked_cross_entropy_sum(hidden_BTD, last.lm_head, labels_BT.to(hidden_BTD.device),
                                             chunk_size=self.loss_chunk_size, target_index_N=target_index_N,
                                             backward_twice=self.schedule_name == "zero_bubble")
        self._losses.append(loss_sum.detach())
        loss = loss_sum * self._norm
        return self.scaler.scale(loss) if self.scaler is not None else loss

    # -- training

    def step(self, batches: Sequence[Batch], *, autocast: Any, stats: StepStats) -> Tensor:
        """Forward and backward over the step's micro-batches; the step's summed loss on every rank."""
        gangs, device = self.gangs, self.gangs.device
        if len(batches) != self.micro_batches:
            raise RuntimeError(f"a pipeline step takes {self.micro_batches} micro-batches, got {len(batches)}")
        step_targets = torch.tensor(sum(b.num_target_tokens for b in batches), dtype=torch.int64)
        gangs.dp.all_reduce(step_targets)
        self._norm = gangs.dp.size / max(int(step_targets), 1)
        for batch in batches:
            stats.count(batch)
        padded = pad_batches(batches)
        shape = tuple(padded[0].tokens_BT.shape)
        if shape != self._shape:
            self._schedule, self._shape = self._build(shape), shape
        tokens = torch.cat([b.tokens_BT for b in padded]).to(device)
        kwargs = {"positions_BT": torch.cat([b.positions_BT for b in padded]).to(device),
                  "document_ids_BT": torch.cat([b.document_ids_BT for b in padded]).to(device)}
        labels = torch.cat([b.labels_BT for b in padded])
        self._losses = []
        with autocast:
            self._schedule.step(tokens, target=labels, **kwargs)
        # The first step's metadata inference may call the loss on example outputs too: the real ones come last.
        real = self._losses[-self.micro_batches:]
        step_loss = torch.stack(real).sum() if real else torch.zeros((), device=device)
        self._sync_tied_gradient()
        dist.broadcast(step_loss, group=gangs.pp.group, group_src=self.last_rank)
        stats.loss_sum += step_loss
        return step_loss

    def _sync_tied_gradient(self) -> None:
        weight = self.model.tied_weight()
        if weight is None or self._tied_group is None or weight.grad is None:
            return
        grad = weight.grad
        if hasattr(grad, "placements") and grad.placements != weight.placements:
            # Under TP the embedding's backward leaves a replicated (full) gradient, the
            # lm_head's a vocab shard: both stages must sum the same shard of it.
            grad = weight.grad = grad.redistribute(placements=weight.placements)
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        dist.all_reduce(local, group=self._tied_group)

    def clip_grad_norm(self, model: Any, max_norm: float | None) -> Tensor:
        """Like `ft.training.optim.clip_grad_norm`, over every stage of the pipeline."""
        local = clip_grad_norm(model, None)
        total_sq = local.float() ** 2
        weight = self.model.tied_weight()
        if weight is not None and weight.grad is not None and not self.model.has_first:
            grad_norm = torch.linalg.vector_norm(weight.grad)  # the first stage counts the tied weight
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            total_sq = total_sq - grad_norm.float() ** 2
        dist.all_reduce(total_sq, group=self.gangs.pp.group)
        total = total_sq.clamp(min=0).sqrt()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if max_norm is not None and grads:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            local_grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
            torch._foreach_mul_(local_grads, coef.to(local_grads[0].dtype))
        return total

    # -- validation

    @torch.no_grad()
    def validate(self, batches: Any, *, autocast: Any) -> dict[str, Any]:
        """Mean loss per target token over this dp rank's share of a split, forward only."""
        gangs, device = self.gangs, self.gangs.device
        pp = self.model.pp_size
        me = gangs.pp.rank
        views = {view.stage_index: view for view in self.model.stages}
        self.model.eval()
        loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        targets = torch.zeros((), device=device, dtype=torch.int64)
        with autocast:
            for batch in batches:
                targets += batch.num_target_tokens
                on = batch.to(device)
                x: Tensor = on.tokens_BT
                for s in range(self.n_stages):
                    if s % pp != me:
                        continue
                    if s > 0 and (s - 1) % pp != me:
                        x = _recv_hidden(on.tokens_BT.shape, self.model.config.dim, device, gangs, (s - 1) % pp)
                    x = views[s](x, on.positions_BT, on.document_ids_BT)
                    if s == self.n_stages - 1:
                        index = target_positions(batch.labels_BT).to(device)
                        loss_sum += chunked_cross_entropy_sum(x, views[s].lm_head, on.labels_BT,
                                                              chunk_size=self.loss_chunk_size, target_index_N=index)
                    elif (s + 1) % pp != me:
                        _send_hidden(x, gangs, (s + 1) % pp)
        dist.broadcast(loss_sum, group=gangs.pp.group, group_src=self.last_rank)
        gangs.dp.all_reduce(loss_sum)
        gangs.dp.all_reduce(targets)
        self.model.train()
        return {"loss": float(loss_sum) / max(int(targets), 1), "target_tokens": int(targets)}


_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _send_hidden(x: Tensor, gangs: Gangs, dst: int) -> None:
    # Sent as float32 with its dtype in front (exact for every dtype listed).
    dist.send(torch.tensor([_DTYPES.index(x.dtype)], device=x.device), group=gangs.pp.group, group_dst=dst)
    dist.send(x.float().contiguous(), group=gangs.pp.group, group_dst=dst)


def _recv_hidden(shape_BT: Any, dim: int, device: torch.device, gangs: Gangs, src: int) -> Tensor:
    code = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(code, group=gangs.pp.group, group_src=src)
    x = torch.empty((*shape_BT, dim), dtype=torch.float32, device=device)
    dist.recv(x, group=gangs.pp.group, group_src=src)
    return x.to(_DTYPES[int(code)])


# ---------------------------------------------------------------------------------
# Export


def export_pipeline_hf_model(model: PipelineRankModel, directory: Path, *, gangs: Gangs, dtype: torch.dtype,
                             tokenizer: Any = None, defer: bool = False) -> Callable[[], None] | None:
    """`ft.training.export.export_hf_model` for a pipeline: a collective over all ranks.
    Each stage's dp/tp rank 0 gathers its tensors (on the host, in `dtype`), global
    rank 0 receives them all and writes one HF directory."""
    import logging

    from ft.models.hf_export import save_hf_state_dict
    from ft.models.parallelize import iter_full_state_dict

    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    stage_main = gangs.dp.rank == 0 and gangs.tp.rank == 0
    mine: dict[str, Tensor] = {}
    for name, tensor in iter_full_state_dict(model, rank0_only=False, dtype=dtype):
        if stage_main:
            mine[name] = tensor
    merged = gather_from_stages(mine, gangs=gangs)
    if merged is None:
        return None
    write = functools.partial(save_hf_state_dict, list(merged.items()), model.config, directory, dtype=dtype,
                              tokenizer=tokenizer)
    if defer:
        return write
    write()
    return None


def gather_from_stages(mine: dict[str, Tensor], *, gangs: Gangs) -> dict[str, Tensor] | None:
    """Every stage's `mine` (host tensors by full-model name, the same on a stage's dp/tp
    ranks) merged on global rank 0 in the full model's order; None on the other ranks.
    Every rank calls it; a tensor two stages hold (a tied embedding) is taken once."""
    if gangs.dp.rank != 0 or gangs.tp.rank != 0:
        return None
    parts: list[Any] = [None] * gangs.pp.size if gangs.pp.rank == 0 else None  # type: ignore[assignment]
    dist.gather_object(mine, parts, group=gangs.pp.group, group_dst=0)
    if gangs.pp.rank != 0 or not gangs.is_main:
        return None
    merged: dict[str, Tensor] = {}
    for part in parts:
        for name, tensor in part.items():
            merged.setdefault(name, tensor)
    return {name: merged[name] for name in _full_order(merged)}


def _full_order(names: dict[str, Tensor]) -> list[str]:
    """Names in the full model's order: embedding, blocks by index, norm, head."""
    def key(name: str) -> tuple[int, int, str]:
        parts = name.split(".")
        if name.startswith("model.embed_tokens."):
            return (0, 0, name)
        if name.startswith("model.layers."):
            return (1, int(parts[2]), name)
        if name.startswith("model.norm."):
            return (2, 0, name)
        return (3, 0, name)

    return sorted(names, key=key)


__all__ = ["PipelineRunner", "export_pipeline_hf_model", "gather_from_stages", "pad_batches"]
