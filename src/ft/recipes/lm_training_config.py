"""The config keys every language-model training recipe shares: model and data,
lengths, precision, run length, optimizer and schedule, parallelism, LoRA,
checkpoints and metrics, with their checks.

`ft lm instruction_finetune` and `ft lm preference_finetune` extend
`LmTrainingConfig`; the defaults here are instruction_finetune's (they train the
embedded default on a CPU). A recipe redeclares a key to give it its own default
or description; the key keeps its place in `--dump-config` and `--help`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ft.errors import ConfigError
from ft.lora.config import LoraConfig, check_embeddings_on_host_layout, check_lora_config


@dataclass(kw_only=True)
class LmTrainingConfig:
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
    activation_checkpointing: Literal["none", "full", "selective", "elementwise"] = "none"
    """Recompute activations in backward instead of keeping them: `elementwise` keeps attention's and every
    matmul's output and recomputes only the elementwise ops (norms, RoPE, SwiGLU; a few percent more compute),
    `selective` keeps only every other matmul's (about 2/3 of elementwise's memory, a sixth more compute),
    `full` only each block's input (one more forward)."""
    activation_checkpointing_blocks: int | None = None
    """Checkpoint only the first N blocks (0..n_layers; null: every block); the others keep all their activations,
    trading memory left over for less recompute (`--dry-run` predicts the peak)."""
    torch_compile: Literal["auto"] | bool = "auto"
    """Compile each block with torch.compile; `auto`: on for CUDA, off on a CPU (logged either way)."""
    loss_chunk_size: int = 1024
    """Tokens per chunk of the cross-entropy, so full-vocabulary fp32 logits never exist at once."""

    # Parallelism (torchrun / Slurm / one process).
    data_parallelism: Literal["fsdp", "ddp"] = "fsdp"
    tensor_parallel_size: int = 1
    fsdp_reshard_after_forward: bool = True
    fsdp_replicas: int = 1
    """HSDP: replicate across this many groups and shard within each (1: plain FSDP)."""

    # LoRA / QLoRA (off: full fine-tuning).
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapters on a frozen base: `lora.enabled=true`, `lora.rank`, `lora.alpha`, `lora.target_modules`, ..."""

    # Checkpoints.
    checkpoint_every_n_steps: int = 1000
    keep_last_n_checkpoints: int | None = 1
    keep_last_n_models: int | None = None
    save_model_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    resume_checkpoint_dir: str | None = None
    """Start from another run's weights: a `checkpoints` directory, with
    `model=last_checkpoint` or `model=checkpoint_step_N`."""
    save_model_only: bool = False
    """Checkpoints hold only the HF-layout model, no trainer state: smaller and faster, but the run cannot resume."""
    checkpoint_in_background: bool = True
    """Write checkpoints on a worker thread while training goes on (the next save and the end of the run wait)."""

    # Metrics and validation.
    publish_metrics_every_n_steps: int = 10
    validate_every_n_steps: int | None = None
    metric_recorders: list[str] = field(default_factory=lambda: ["jsonl"])
    """Recorders of `ft.training.metrics.METRIC_RECORDERS`: jsonl (always on), tensorboard, wandb."""
    wandb_project: str = "ft"
    peak_tflops: float | None = None
    """The device's peak for MFU; default: a table of known GPUs."""

    # Counts that must be at least 1; a recipe adds its own.
    POSITIVE_KEYS: ClassVar[tuple[str, ...]] = (
        "max_seq_len", "max_num_tokens", "max_num_steps", "gradient_accumulation", "checkpoint_every_n_steps",
        "publish_metrics_every_n_steps", "tensor_parallel_size", "fsdp_replicas", "loss_chunk_size",
    )

    def __post_init__(self) -> None:
        # The registries import torch; `--help` reads this class without it.
        from ft.training.metrics import check_recorder_names
        from ft.training.optim import LR_SCHEDULES

        # Names looked up in a registry are plain `str` fields (a Literal would repeat
        # the registry); they are checked here, so a bad one fails before any work.
        LR_SCHEDULES.get(self.lr_schedule, key="lr_schedule")
        check_recorder_names(self.metric_recorders, key="metric_recorders")
        check_lora_config(self.lora)
        check_optimizer_values(self)
        from ft.models.parallelize import check_checkpointed_blocks

        # The upper bound is the model's block count, checked with the layout (`check_parallel_layout`).
        check_checkpointed_blocks(self.activation_checkpointing_blocks,
                                  activation_checkpointing=self.activation_checkpointing, n_layers=None)

    def check(self) -> None:
        """Counts out of range, caught before any work starts (a recipe's `check` adds its own rules)."""
        for key in self.POSITIVE_KEYS:
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{key}' must be at least 1, got {getattr(self, key)}")
        for key in ("keep_last_n_checkpoints", "keep_last_n_models", "validate_every_n_steps", "max_num_data_epochs"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"config key '{key}' must be at least 1 or null, got {value}")
        check_embeddings_on_host_layout(self.lora, tensor_parallel_size=self.tensor_parallel_size,
                                        pipeline_parallel_size=getattr(self, "pipeline_parallel_size", 1),
                                        fsdp_replicas=self.fsdp_replicas)


def check_optimizer_values(config: LmTrainingConfig) -> None:
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
