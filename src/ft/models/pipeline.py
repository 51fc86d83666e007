"""Pipeline parallelism for any model family: a model's decoder blocks split into stages.

`pipeline_stages(model, pp_rank=, pp_size=, schedule=)` turns the meta-device full
model into this rank's `PipelineRankModel` (checkpoints, optimizer, export, clipping
see it) and its `StageView`s (what `torch.distributed.pipelining` runs):

- the blocks of `model.model.layers` are cut into `pp_size * stages_per_rank`
  consecutive stages; rank r holds stages r, r + pp_size, ... (the loop order of
  torch's interleaved schedules); the first stage also holds `embed_tokens`, the
  last `norm` and `lm_head` (and, for a tied model, `embed_tokens` too, whose
  gradient `sync_tied_gradients` sums with the first stage's);
- every module keeps the full model's name (`model.layers.5.mlp.up_proj.weight`:
  the blocks live in a `ModuleDict` keyed by their index), so a checkpoint saved on
  pp=2 loads on dp=2 and back, and HF export needs no renaming;
- a `StageView` registers the same module objects under the same names; it is the
  unit FSDP/TP (`ft.models.parallelize.parallelize_model`) and the schedule see.

Schedules (`pipeline_schedule=`): gpipe, 1f1b (one stage per rank),
interleaved_1f1b and zero_bubble (`ScheduleInterleavedZeroBubble`, two stages per
rank). Every family subclasses `ft.models.llama.Llama`, so one stage forward
(embed, RoPE, mask, blocks, norm) serves all of them.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ft.errors import ConfigError

# schedule name -> (torch class name, stages per rank)
SCHEDULES: dict[str, tuple[str, int]] = {
    "gpipe": ("ScheduleGPipe", 1),
    "1f1b": ("Schedule1F1B", 1),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", 2),
    "zero_bubble": ("ScheduleInterleavedZeroBubble", 2),
}


def schedule_class(name: str) -> type:
    import torch.distributed.pipelining as pipelining

    class_name = SCHEDULES[name][0]
    cls = getattr(pipelining, class_name, None)
    if cls is None:
        raise ConfigError(f"pipeline_schedule={name!r} needs torch's {class_name}, which this torch "
                          f"({torch.__version__}) does not have; use 'gpipe' or '1f1b'")
    return cls


def check_pipeline_layout(config: Any, *, pipeline_parallel_size: int, schedule: str, micro_batches: int) -> None:
    """ConfigError for a pipeline layout that cannot work; cheap, call it before any work."""
    pp = pipeline_parallel_size
    if pp < 1:
        raise ConfigError(f"pipeline_parallel_size={pp} must be at least 1")
    if schedule not in SCHEDULES:
        raise ConfigError(f"pipeline_schedule={schedule!r} is not one of {sorted(SCHEDULES)}")
    if pp == 1:
        return
    per_rank = SCHEDULES[schedule][1]
    n_stages = pp * per_rank
    if n_stages > config.n_layers:
        raise ConfigError(
            f"pipeline_parallel_size={pp} with pipeline_schedule={schedule} makes {n_stages} stages, but the model "
            f"has only {config.n_layers} layers; use pipeline_parallel_size <= {config.n_layers // per_rank}"
            + (" or pipeline_schedule=1f1b" if per_rank > 1 else "")
        )
    if micro_batches < pp:
        raise ConfigError(
            f"pipeline_parallel_size={pp} needs at least {pp} micro-batches per step to fill the pipeline, "
            f"gradient_accumulation={micro_batches} gives {micro_batches}; set gradient_accumulation >= {pp}"
        )
    if per_rank > 1:
        rounds = max(1, micro_batches // pp)
        if micro_batches % rounds:
            raise ConfigError(
                f"pipeline_schedule={schedule} runs micro-batches in rounds of pipeline_parallel_size={pp}: "
                f"gradient_accumulation={micro_batches} must be a multiple of {pp}"
            )


def split_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Consecutive block indices per stage; the first `n_layers % n_stages` stages take one more."""
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


class _Layers(nn.ModuleDict):
    """Blocks keyed by their index in the full model (so names stay `layers.<i>.`);
    iterates over the blocks, as the `ModuleList` it replaces does."""

    def __iter__(self) -> Iterator[nn.Module]:  # type: ignore[override]
        return iter(self.values())


def _trunk(full: nn.Module, layer_ids: list[int], *, embed: bool, norm: bool) -> nn.Module:
    trunk = nn.Module()
    if embed:
        trunk.embed_tokens = full.model.embed_tokens
    trunk.layers = _Layers({str(i): full.model.layers[i] for i in layer_ids})
    if norm:
        trunk.norm = full.model.norm
    trunk.rotary_emb = full.model.rotary_emb
    return trunk


class StageView(nn.Module):
    """One pipeline stage: the full model's modules it runs, under their full names.

    forward: the first stage takes `tokens_BT`, the others the hidden states [B, T, D]
    of the stage before; the last returns the final-norm hidden states (the loss is
    computed through `lm_head` outside, chunked), the others their block output.
    """

    def __init__(self, full: nn.Module, *, stage_index: int, n_stages: int, layer_ids: list[int]) -> None:
        super().__init__()
        self.config = full.config
        self.stage_index, self.n_stages = stage_index, n_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == n_stages - 1
        tied = full.config.tie_embeddings
        self.model = _trunk(full, layer_ids, embed=self.is_first or (self.is_last and tied), norm=self.is_last)
        if self.is_last:
            self.lm_head = full.lm_head

    def tie_weights(self) -> None:
        if self.config.tie_embeddings and self.is_last:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, x: Tensor, positions_BT: Tensor, document_ids_BT: Tensor) -> Tensor:
        from ft.models.llama.model import document_causal_mask

        h_BTD = self.model.embed_tokens(x) if self.is_first else x
        cos_BTH, sin_BTH = self.model.rotary_emb(positions_BT, h_BTD.dtype)
        mask = document_causal_mask(document_ids_BT)
        for layer in self.model.layers:
            h_BTD = layer(h_BTD, cos_BTH, sin_BTH, mask, None)
        return self.model.norm(h_BTD) if self.is_last else h_BTD


class PipelineRankModel(nn.Module):
    """The part of the model one pipeline rank holds, under the full model's names.

    It is what checkpoints, the optimizer, gradient clipping and export see; the
    schedule runs its `stages` (kept in a plain list, so they add no names).
    """

    holds_part_of_model = True  # `ft.models.checkpoint` loads only the tensors it holds

    def __init__(self, full: nn.Module, stages: list[StageView], *, pp_rank: int, pp_size: int) -> None:
        super().__init__()
        self.config = full.config
        self.pp_rank, self.pp_size = pp_rank, pp_size
        self.stages = stages
        layer_ids = [int(i) for stage in stages for i in stage.model.layers.keys()]
        has_first = any(s.is_first for s in stages)
        has_last = any(s.is_last for s in stages)
        self.has_first, self.has_last = has_first, has_last
        self.model = _trunk(full, layer_ids, embed=has_first or (has_last and full.config.tie_embeddings),
                            norm=has_last)
        if has_last:
            self.lm_head = full.lm_head
        # The full model's init order, so `init_weights(seed)` gives each stage the
        # weights the whole model would get from that seed.
        self._init_order = [(name, type(m), tuple(m.weight.shape)) for name, m in full.named_modules()
                            if isinstance(m, (nn.Linear, nn.Embedding)) or type(m).__name__ == "RMSNorm"]

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        raise RuntimeError("a pipeline rank's model runs through its schedule (ft.training.pipeline_step)")

    def tie_weights(self) -> None:
        if self.config.tie_embeddings and self.has_last:
            self.lm_head.weight = self.model.embed_tokens.weight
        for stage in self.stages:
            stage.tie_weights()

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> "PipelineRankModel":
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    def reset_buffers(self) -> None:
        self.model.rotary_emb.reset_buffers()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """The full model's `init_weights(seed)`, restricted to this rank's modules: the
        random draws of the modules other ranks hold are made and dropped."""
        from ft.models.llama.model import _cuda_devices

        device = next(self.parameters()).device
        held = dict(self.named_modules())
        with torch.random.fork_rng(devices=_cuda_devices(self)):
            if seed is not None:
                torch.manual_seed(seed)
            for name, kind, shape in self._init_order:
                if kind is not nn.Linear and kind is not nn.Embedding:
                    if name in held:
                        held[name].reset_parameters()
                    continue
                if name == "lm_head" and self.config.tie_embeddings:
                    continue
                if name not in held:
                    torch.empty(shape, device=device).normal_(0.0, self.config.init_std)  # keep the RNG in step
                    continue
                module = held[name]
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def held_elsewhere(self, name: str) -> bool:
        """Whether the full model's tensor `name` belongs to modules another pipeline rank holds."""
        parts = name.split(".")
        if name.startswith("model.layers.") and len(parts) > 2 and parts[2].isdigit():
            return int(parts[2]) < self.config.n_layers and parts[2] not in self.model.layers
        if name.startswith("model.embed_tokens."):
            return not hasattr(self.model, "embed_tokens")
        if name.startswith(("model.norm.", "lm_head.")):
            return not self.has_last
        return False

    def tied_weight(self) -> nn.Parameter | None:
        """The embedding a tied model's first and last stage both hold (None otherwise)."""
        if self.pp_size > 1 and self.config.tie_embeddings and (self.has_first or self.has_last):
            return self.model.embed_tokens.weight
        return None


def pipeline_stages(full: nn.Module, *, pp_rank: int, pp_size: int, schedule: str) -> PipelineRankModel:
    """This rank's part of `full` (built on meta) for `schedule`; see the module doc."""
    per_rank = SCHEDULES[schedule][1]
    n_stages = pp_size * per_rank
    layers = split_layers(full.config.n_layers, n_stages)
    stages = [StageView(full, stage_index=s, n_stages=n_stages, layer_ids=layers[s])
              for s in range(pp_rank, n_stages, pp_size)]
    return PipelineRankModel(full, stages, pp_rank=pp_rank, pp_size=pp_size)


def with_pipeline(parallelize: Any, *, pp_rank: int, pp_size: int, schedule: str) -> Any:
    """`parallelize` (full meta model -> parallelized model) for a pipeline rank: the
    model is cut into this rank's `PipelineRankModel` and each stage is parallelized
    on its own (each stage is an FSDP root). Unchanged for pp_size=1."""
    if pp_size == 1:
        return parallelize

    def parallelize_stages(full: nn.Module) -> PipelineRankModel:
        rank_model = pipeline_stages(full, pp_rank=pp_rank, pp_size=pp_size, schedule=schedule)
        for view in rank_model.stages:
            parallelize(view)
        return rank_model

    return parallelize_stages


def stage_rank(stage_index: int, pp_size: int) -> int:
    """The pp rank that runs `stage_index` (loop order)."""
    return stage_index % pp_size


__all__ = ["PipelineRankModel", "SCHEDULES", "StageView", "check_pipeline_layout", "pipeline_stages",
           "schedule_class", "split_layers", "stage_rank", "with_pipeline"]
