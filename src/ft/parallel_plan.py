"""`parallel_plan=auto`: choose the parallel layout of a run from the model, the GPUs and the batch.

`choose_plan(...)` tries every layout of `world_size` GPUs — tensor parallel size
(within a node, dividing the model's heads, ffn and vocabulary), pipeline stages
(at most the micro-batches per step and the layers), data parallel over the rest
(HSDP with one replica per node once dp spans nodes) — with each activation
checkpointing mode and, on one GPU, optimizer offload. Settings the user chose
(`fixed`) are kept, and layouts the recipe's config checks refuse beside the run's
other settings are skipped (`recipe_refusal`: e.g. no pipeline stages with
sequence_parallel, activation_offloading or DDP; no tensor parallelism or HSDP with
DDP). Of the layouts whose predicted peak (`ft.training.memory_model`,
with slack) fits the GPU's memory, it takes the fastest by a simple throughput model:

    time ~ recompute x tp communication x pipeline bubble x offload

- recompute: 1 (none), 1.07 (elementwise: measured 1.09x faster than selective on the 8B
  shape), 1.17 (selective: a sixth more compute), 1.33 (full: one more forward);
- tp communication: 1 + 0.08 (tp - 1) (two all-reduces per block on NVLink);
- pipeline bubble: 1 + (pp - 1) / micro_batches (1F1B's idle time);
- offload: 1.5 (the optimizer step on the CPU);
- plain FSDP over several nodes: 1.05 against HSDP (one replica per node);
ties go to the smaller tp, then pp (fewer moving parts).

A pipeline stage's memory is the memory model's for a model of `ceil(layers / pp)`
layers (the embeddings and head counted on every stage: an upper bound), its
activations times `pp` (1F1B keeps pp micro-batches in flight on the first stage).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ft.errors import ConfigError
from ft.training.memory_model import GIB, MemoryEstimate, MemoryPlan, parameter_shapes, predict_memory

RECOMPUTE_COST = {"none": 1.0, "elementwise": 1.07, "selective": 1.17, "full": 1.33}
TP_COST = 0.08
OFFLOAD_COST = 1.5
CROSS_NODE_COST = 1.05  # FSDP's gathers over every node instead of HSDP's within one

# The recipe keys the planner sets (their values away from the defaults are kept).
PLANNED_KEYS = ("tensor_parallel_size", "pipeline_parallel_size", "fsdp_replicas", "activation_checkpointing",
                "optimizer_cpu_offload")


@dataclass(frozen=True)
class ParallelChoice:
    tp: int
    pp: int
    dp: int
    replicas: int
    activation_checkpointing: str
    optimizer_cpu_offload: bool
    estimate: MemoryEstimate
    cost: float

    def settings(self) -> dict[str, Any]:
        """The recipe keys of this choice."""
        return {"tensor_parallel_size": self.tp, "pipeline_parallel_size": self.pp, "fsdp_replicas": self.replicas,
                "activation_checkpointing": self.activation_checkpointing,
                "optimizer_cpu_offload": self.optimizer_cpu_offload}

    def describe(self) -> str:
        return (f"parallel plan: dp={self.dp}" + (f" (HSDP {self.replicas} replicas)" if self.replicas > 1 else "")
                + f" tp={self.tp} pp={self.pp} activation_checkpointing={self.activation_checkpointing}"
                + f" optimizer_cpu_offload={str(self.optimizer_cpu_offload).lower()}; predicted peak "
                f"{self.estimate.peak / GIB:.2f} GiB per GPU ({self.estimate.peak_with_slack / GIB:.2f} with slack), "
                f"relative step time {self.cost:.2f}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _tp_ok(config: Any, tp: int) -> bool:
    return all(size % tp == 0 for size in (config.n_heads, config.n_kv_heads, config.ffn_dim, config.vocab_size))


def stage_estimate(base: MemoryPlan, *, tp: int, pp: int, dp_shard: int, activation_checkpointing: str,
                   offload: bool, shapes_cache: dict[int, dict]) -> MemoryEstimate:
    """Predicted memory of the busiest pipeline stage (the whole model for pp=1)."""
    config = base.model_config
    layers = math.ceil(config.n_layers / pp)
    stage_config = dataclasses.replace(config, n_layers=layers) if pp > 1 else config
    if layers not in shapes_cache:
        shapes_cache[layers] = parameter_shapes(stage_config)
    plan = dataclasses.replace(base, model_config=stage_config, tp_size=tp, dp_size=dp_shard,
                               activation_checkpointing=activation_checkpointing, optimizer_cpu_offload=offload)
    estimate = predict_memory(plan, shapes_cache[layers])
    if pp > 1:
        estimate = dataclasses.replace(estimate, activations=estimate.activations * pp)
        estimate = dataclasses.replace(estimate, allocator_slack=0.05 * estimate.peak + 0.5 * GIB)
    return estimate


def choose_plan(base: MemoryPlan, *, world_size: int, gpu_memory_bytes: float, micro_batches: int,
                gpus_per_node: int = 8, fixed: dict[str, Any] | None = None,
                refusal: Callable[[dict[str, Any]], str | None] | None = None) -> ParallelChoice:
    """The fastest layout that fits (see the module doc); ConfigError when none does.
    `refusal(settings)`: why the run cannot use a layout's planned keys, or None."""
    fixed = dict(fixed or {})
    config = base.model_config
    node = min(gpus_per_node, world_size)
    shapes: dict[int, dict] = {}
    best: ParallelChoice | None = None
    tried = 0
    refused: list[str] = []
    for tp in _divisors(node):
        if fixed.get("tensor_parallel_size", tp) != tp or not _tp_ok(config, tp):
            continue
        for pp in _divisors(world_size // tp):
            if fixed.get("pipeline_parallel_size", pp) != pp or pp > config.n_layers:
                continue
            if pp > micro_batches and "pipeline_parallel_size" not in fixed:
                continue  # more stages than micro-batches per step would change the batch
            dp = world_size // (tp * pp)
            per_node = max(1, node // (tp * pp))
            hsdp = dp // per_node if dp > per_node and dp % per_node == 0 else 1
            for replicas, ac in itertools.product(sorted({1, hsdp}), tuple(RECOMPUTE_COST)):
                if fixed.get("fsdp_replicas", replicas) != replicas or dp % replicas:
                    continue
                if fixed.get("activation_checkpointing", ac) != ac:
                    continue
                for offload in (False, True):
                    if fixed.get("optimizer_cpu_offload", offload) != offload or (offload and world_size > 1):
                        continue
                    reason = refusal(dict(zip(PLANNED_KEYS, (tp, pp, replicas, ac, offload)))) if refusal else None
                    if reason is not None:
                        refused.append(reason)
                        continue
                    tried += 1
                    estimate = stage_estimate(base, tp=tp, pp=pp, dp_shard=dp // replicas,
                                              activation_checkpointing=ac, offload=offload, shapes_cache=shapes)
                    if estimate.peak_with_slack > gpu_memory_bytes:
                        continue
                    cost = (RECOMPUTE_COST[ac] * (1 + TP_COST * (tp - 1)) * (1 + (pp - 1) / micro_batches)
                            * (OFFLOAD_COST if offload else 1.0) * (1.0 if replicas == hsdp else CROSS_NODE_COST))
                    choice = ParallelChoice(tp, pp, dp, replicas, ac, offload, estimate, round(cost, 4))
                    if best is None or (choice.cost, choice.tp, choice.pp) < (best.cost, best.tp, best.pp):
                        best = choice
    if best is None:
        kept = ", ".join(f"{k}={v}" for k, v in fixed.items()) or "nothing"
        others = (f"; {len(refused)} more refused with this run's other settings, e.g. {refused[0]}"
                  if refused else "")
        raise ConfigError(
            f"parallel_plan=auto: none of the {tried} layouts of {world_size} GPU(s) with "
            f"{gpu_memory_bytes / GIB:.1f} GiB each fits (kept by hand: {kept}{others}); use more GPUs, a smaller "
            f"max_num_tokens, LoRA, or set max_memory_gib if the GPU has more memory"
        )
    return best


def fixed_settings(config: Any) -> dict[str, Any]:
    """The planned keys whose values differ from the config class's defaults: set by hand, kept."""
    defaults = type(config)()
    return {key: getattr(config, key) for key in PLANNED_KEYS if getattr(config, key) != getattr(defaults, key)}


def recipe_refusal(config: Any, model_config: Any) -> Callable[[dict[str, Any]], str | None]:
    """`refusal` for `choose_plan`: the message of the recipe's own checks (the config's and the
    model layout's) for `config` with a layout's planned keys, or None when they pass."""
    from ft.models.parallelize import check_parallel_layout
    from ft.models.pipeline import check_pipeline_layout

    def refusal(settings: dict[str, Any]) -> str | None:
        try:
            candidate = dataclasses.replace(config, **settings)  # runs __post_init__'s checks too
            candidate.check()
            check_parallel_layout(model_config, tensor_parallel_size=candidate.tensor_parallel_size,
                                  data_parallelism=candidate.data_parallelism,
                                  activation_checkpointing=candidate.activation_checkpointing,
                                  activation_checkpointing_blocks=candidate.activation_checkpointing_blocks)
            check_pipeline_layout(model_config, pipeline_parallel_size=candidate.pipeline_parallel_size,
                                  schedule=candidate.pipeline_schedule, micro_batches=candidate.gradient_accumulation)
        except ConfigError as error:
            return str(error)
        return None

    return refusal


def apply_parallel_plan(config: Any, *, world_size: int, gpu_memory_bytes: float | None,
                        log: Any = print) -> tuple[Any, ParallelChoice | None]:
    """`config` with the planned keys filled in when `parallel_plan=auto` (else unchanged)."""
    if config.parallel_plan != "auto":
        return config, None
    if gpu_memory_bytes is None:
        raise ConfigError("parallel_plan=auto needs the GPU's memory: run on a GPU or set max_memory_gib")
    from ft.recipes.memory_plan import memory_plan, planning_model_source

    source = planning_model_source(config)
    base = memory_plan(config, source.config, dp_size=1, tp_size=1)
    # sequence_parallel=true is the user's: checked as set, so no stages are planned with it.
    choice = choose_plan(base, world_size=world_size, gpu_memory_bytes=gpu_memory_bytes,
                         micro_batches=config.gradient_accumulation, fixed=fixed_settings(config),
                         refusal=recipe_refusal(config, source.config))
    log(choice.describe())
    settings = choice.settings()
    sequence_parallel = config.sequence_parallel and choice.tp > 1  # nothing to shard without TP
    return dataclasses.replace(config, **settings, sequence_parallel=sequence_parallel), choice


def plan_parallelism(config: Any) -> Any:
    """The recipe's entry: with `parallel_plan=auto`, `config` with the chosen layout
    (printed once, by the launch's rank 0), for this launch's processes and the GPU's
    memory (`max_memory_gib` overrides); otherwise `config` unchanged."""
    if config.parallel_plan != "auto":
        return config
    import torch

    from ft.gang import detect_launch

    launch = detect_launch()
    memory = config.max_memory_gib * GIB if config.max_memory_gib is not None else (
        float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None)
    planned, _ = apply_parallel_plan(config, world_size=launch.world_size, gpu_memory_bytes=memory,
                                     log=print if launch.rank == 0 else (lambda line: None))
    return planned


__all__ = ["ParallelChoice", "apply_parallel_plan", "choose_plan", "fixed_settings", "plan_parallelism",
           "recipe_refusal", "stage_estimate"]
