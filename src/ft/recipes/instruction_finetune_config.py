"""The config of `ft lm instruction_finetune`: every key a user can set.

Key names follow fairseq2's instruction fine-tuning tutorial. The
defaults train the embedded default (tiny model, tokenizer, dataset) on a CPU in
about a minute; for a real model set at least `model`, `dataset`, `dtype`,
`learning_rate` and `max_num_steps`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ft.data.formats import check_format_name
from ft.lora.config import LoraConfig, check_lora_config
from ft.errors import ConfigError
from ft.training.metrics import check_recorder_names
from ft.training.optim import LR_SCHEDULES
from ft.training.optimizers import OptimizerSettings, check_optimizer_settings


@dataclass(kw_only=True)
class InstructionFinetuneConfig:
    # What to train on.
    model: str = "ft_tiny"
    """A model card name, a checkpoint path, or with `resume_checkpoint_dir`:
    `last_checkpoint` / `checkpoint_step_N`."""
    tokenizer: str | None = None
    """A tokenizer card or path; default: the model card's tokenizer."""
    dataset: str = "ft_default_sft"
    """A dataset card name, a .jsonl file, or a directory of them (subfolders are splits)."""
    train_split: str = "train"
    valid_split: str = "valid"
    dataset_format: str = "auto"
    """`auto` (detect per row) or a registered format (`ft.data.DATA_FORMATS`)."""
    max_seq_len: int = 512
    max_num_tokens: int = 2048
    """Tokens per micro-batch per rank (rows x max_seq_len)."""
    packing: bool = True
    example_too_long: Literal["drop", "truncate"] = "drop"
    skip_malformed_lines: bool = False

    # Precision and device.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype; auto is bfloat16 on GPUs and float32 on CPUs."""
    mixed_precision: bool = True
    """Keep float32 master weights and compute in `dtype` (False: parameters in `dtype`)."""
    device: str = "auto"

    # Length of the run.
    max_num_steps: int = 150
    max_num_data_epochs: int | None = None
    seed: int = 2

    # Optimizer and schedule.
    learning_rate: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    max_grad_norm: float | None = 1.0
    gradient_accumulation: int = 1
    lr_schedule: str = "cosine"
    """A registered schedule (`ft.training.optim.LR_SCHEDULES`): cosine, linear or constant."""
    warmup_steps: int = 10
    final_lr_scale: float = 0.1
    """The learning rate at the last step, as a fraction of `learning_rate`."""
    nonfinite_policy: Literal["stop", "skip_step"] = "stop"
    """A nan/inf loss or gradient norm: `stop` the run before any save (exit code 3),
    or `skip_step`: that step makes no update."""

    # Memory and speed.
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    torch_compile: Literal["auto"] | bool = "auto"
    """Compile each block with torch.compile; `auto`: on for CUDA, off on a CPU (logged either way)."""
    fp8: Literal["none", "tensorwise", "rowwise"] = "none"
    """Linear layers in float8 through torchao (CUDA, compute capability >= 8.9): `tensorwise` (fastest) or
    `rowwise` scaling; the output projection stays in `dtype` (`ft.models.fp8`)."""
    loss_chunk_size: int = 1024
    """Tokens per chunk of the cross-entropy, so full-vocabulary fp32 logits never exist at once."""
    optimizer: str = "adamw"
    """A registered optimizer (`ft.training.optimizers.OPTIMIZERS`): adamw, adamw8bit, adamw4bit (torchao), adafactor."""
    optimizer_in_backward: bool = False
    """Step each parameter and free its gradient as soon as the gradient is ready (needs max_grad_norm=null,
    gradient_accumulation=1)."""
    optimizer_cpu_offload: bool = False
    """Optimizer states, float32 master weights and the step on the CPU (one process)."""
    bf16_stochastic_rounding: bool = False
    """Pure bf16 (mixed_precision=false): round each parameter update stochastically so small steps survive."""
    activation_offloading: bool = False
    """Move saved activations to pinned host memory during forward and back for backward (CUDA; no-op on a CPU)."""
    max_memory_gib: float | None = None
    """GPU memory to plan for (`--dry-run` says whether the run fits); default: the GPU's memory."""

    # Parallelism (torchrun / Slurm / one process).
    data_parallelism: Literal["fsdp", "ddp"] = "fsdp"
    tensor_parallel_size: int = 1
    fsdp_reshard_after_forward: bool = True
    fsdp_replicas: int = 1
    """HSDP: replicate across this many groups and shard within each (1: plain FSDP)."""
    pipeline_parallel_size: int = 1
    """Pipeline stages: the decoder blocks split over this many ranks; gradient_accumulation micro-batches per
    step go through the pipeline (at least pipeline_parallel_size of them)."""
    pipeline_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"] = "1f1b"
    """The pipeline schedule; interleaved_1f1b and zero_bubble run two stages per rank."""
    sequence_parallel: bool = False
    """With tensor_parallel_size > 1: norms and the residual stream sharded over the sequence between blocks."""
    parallel_plan: Literal["manual", "auto"] = "manual"
    """auto: choose data/tensor/pipeline parallel sizes, activation checkpointing and optimizer offload from the
    model, the processes, GPU memory, max_num_tokens and max_seq_len (keys set away from their defaults are kept)."""

    # LoRA / QLoRA (off: full fine-tuning).
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapters on a frozen base: `lora.enabled=true`, `lora.rank`, `lora.alpha`, `lora.target_modules`, ..."""

    # Checkpoints.
    checkpoint_every_n_steps: int = 1000
    keep_last_n_checkpoints: int | None = 1
    keep_last_n_models: int | None = None
    save_model_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    save_model_only: bool = False
    """Checkpoints hold only the HF-layout model, no trainer state: smaller and faster, but the run cannot resume."""
    checkpoint_in_background: bool = True
    """Write checkpoints on a worker thread while training goes on (the next save and the end of the run wait)."""
    resume_checkpoint_dir: str | None = None
    """Start from another run's weights: a `checkpoints` directory, with
    `model=last_checkpoint` or `model=checkpoint_step_N`."""

    # Metrics and validation.
    publish_metrics_every_n_steps: int = 10
    validate_every_n_steps: int | None = None
    metric_recorders: list[str] = field(default_factory=lambda: ["jsonl"])
    """Recorders of `ft.training.metrics.METRIC_RECORDERS`: jsonl (always on), tensorboard, wandb."""
    wandb_project: str = "ft"
    peak_tflops: float | None = None
    """The device's peak for MFU; default: a table of known GPUs."""

    # Resuming OUT with a different value of these is refused (ft.recipes.run_config):
    # the saved optimizer, schedule base, data position and grad scaler depend on them.
    # (gradient_accumulation may change with the number of ranks: the data reader
    # checks that dp size x accumulation still fits its saved position.)
    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = (
        "learning_rate", "betas", "eps", "weight_decay", "max_seq_len", "max_num_tokens", "packing", "seed",
        "dtype", "mixed_precision", "optimizer", "optimizer_in_backward", "optimizer_cpu_offload",
        "bf16_stochastic_rounding",
    )

    def __post_init__(self) -> None:
        # Names looked up in a registry are plain `str` fields (a Literal would repeat
        # the registry); they are checked here, so a bad one fails before any work.
        check_format_name(self.dataset_format, key="dataset_format")
        LR_SCHEDULES.get(self.lr_schedule, key="lr_schedule")
        check_recorder_names(self.metric_recorders, key="metric_recorders")
        check_lora_config(self.lora)
        _check_optimizer_values(self)
        check_optimizer_settings(
            optimizer_settings(self), gradient_accumulation=self.gradient_accumulation,
            max_grad_norm=self.max_grad_norm, dtype=self.dtype, mixed_precision=self.mixed_precision,
            nonfinite_policy=self.nonfinite_policy, data_parallelism=self.data_parallelism,
            tensor_parallel_size=self.tensor_parallel_size, lora=self.lora.enabled,
        )
        if self.max_memory_gib is not None and not (math.isfinite(self.max_memory_gib) and self.max_memory_gib > 0):
            raise ConfigError(f"config key 'max_memory_gib' must be a finite number > 0, or null, got {self.max_memory_gib!r}")

    def check(self) -> None:
        """Settings that cannot work together, caught before any work starts."""
        positive = ["max_seq_len", "max_num_tokens", "max_num_steps", "gradient_accumulation", "checkpoint_every_n_steps",
                    "publish_metrics_every_n_steps", "tensor_parallel_size", "fsdp_replicas", "loss_chunk_size",
                    "pipeline_parallel_size"]
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{key}' must be at least 1, got {getattr(self, key)}")
        for key in ("keep_last_n_checkpoints", "keep_last_n_models", "validate_every_n_steps", "max_num_data_epochs"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"config key '{key}' must be at least 1 or null, got {value}")
        if self.max_num_tokens < self.max_seq_len:
            raise ConfigError(
                f"config key 'max_num_tokens' ({self.max_num_tokens}) must be at least max_seq_len "
                f"({self.max_seq_len}): a batch holds whole rows"
            )
        check_pipeline_settings(self)
        if self.data_parallelism == "ddp" and self.fsdp_replicas > 1:
            raise ConfigError(f"config key 'fsdp_replicas' ({self.fsdp_replicas}) needs data_parallelism=fsdp "
                              f"(HSDP shards within replicas); DDP replicates over all ranks: use fsdp_replicas=1")


def check_pipeline_settings(config: InstructionFinetuneConfig) -> None:
    """What pipeline stages and sequence parallelism do not combine with (yet)."""
    if config.sequence_parallel and config.tensor_parallel_size == 1 and config.parallel_plan == "manual":
        raise ConfigError("config key 'sequence_parallel' needs tensor_parallel_size > 1 (it shards TP's norms)")
    if config.pipeline_parallel_size == 1:
        return
    for key, bad in (("lora.enabled", config.lora.enabled), ("optimizer_in_backward", config.optimizer_in_backward),
                     ("activation_offloading", config.activation_offloading),
                     ("data_parallelism=ddp", config.data_parallelism == "ddp")):
        if bad:
            raise ConfigError(f"config key '{key.split('=')[0]}' cannot be combined with pipeline_parallel_size="
                              f"{config.pipeline_parallel_size}; use pipeline_parallel_size=1")


def _check_optimizer_values(config: InstructionFinetuneConfig) -> None:
    """Values torch would reject late, or accept and train wrongly (a negative
    max_grad_norm flips every gradient)."""
    def bad(key: str, value, rule: str) -> ConfigError:
        return ConfigError(f"config key '{key}' must be {rule}, got {value!r}")

    for key in ("learning_rate", "weight_decay", "final_lr_scale"):
        value = getattr(config, key)
        if not math.isfinite(value) or value < 0:
            raise bad(key, value, "a finite number >= 0")
    for i, beta in enumerate(config.betas):
        if not 0 <= beta < 1:  # also false for nan
            raise bad(f"betas[{i}]", beta, "in [0, 1)")
    if not (math.isfinite(config.eps) and config.eps > 0):
        raise bad("eps", config.eps, "a finite number > 0")
    if config.max_grad_norm is not None and not (math.isfinite(config.max_grad_norm) and config.max_grad_norm > 0):
        raise bad("max_grad_norm", config.max_grad_norm, "a finite number > 0, or null for no clipping")
    if config.warmup_steps < 0:
        raise bad("warmup_steps", config.warmup_steps, "at least 0")
    if config.peak_tflops is not None and not (math.isfinite(config.peak_tflops) and config.peak_tflops > 0):
        raise bad("peak_tflops", config.peak_tflops, "a finite number > 0, or null")


def optimizer_settings(config: InstructionFinetuneConfig) -> OptimizerSettings:
    """The optimizer section of the config, as `ft.training.optimizers.build_optimizer` takes it."""
    return OptimizerSettings(
        name=config.optimizer, learning_rate=config.learning_rate, betas=config.betas, eps=config.eps,
        weight_decay=config.weight_decay, in_backward=config.optimizer_in_backward,
        cpu_offload=config.optimizer_cpu_offload, stochastic_rounding=config.bf16_stochastic_rounding, seed=config.seed,
    )
