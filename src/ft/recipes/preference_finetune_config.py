"""The config of `ft lm preference_finetune`: every key a user can set.

The keys shared with `ft lm instruction_finetune` (model, data, lengths, precision,
optimizer, parallelism, LoRA, checkpoints, metrics) mean the same there; the
`criterion` section and its key names follow fairseq2 0.4's preference recipes
(`beta`, `nll_scale`, `length_normalization`, `gamma`, `orpo_lambda`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ft.errors import ConfigError
from ft.lora.config import LoraConfig, check_lora_config
from ft.preference.criteria import CriterionConfig
from ft.recipes.instruction_finetune_config import _check_optimizer_values
from ft.training.metrics import check_recorder_names
from ft.training.optim import LR_SCHEDULES


@dataclass(kw_only=True)
class PreferenceFinetuneConfig:
    # What to train on.
    model: str = "ft_tiny"
    """A model card name, a checkpoint path, or with `resume_checkpoint_dir`:
    `last_checkpoint` / `checkpoint_step_N`."""
    tokenizer: str | None = None
    """A tokenizer card or path; default: the model card's tokenizer."""
    dataset: str | None = None
    """Required. Preference rows (`ft.preference.data`): a dataset card name, a .jsonl file, or a
    directory of them (subfolders are splits)."""
    train_split: str = "train"
    valid_split: str = "valid"
    max_seq_len: int = 512
    max_num_tokens: int = 2048
    """Tokens per micro-batch per rank (rows x max_seq_len); at least 2 x max_seq_len, since a
    micro-batch holds both sequences of a pair."""
    packing: bool = True
    example_too_long: Literal["drop", "truncate"] = "drop"
    skip_malformed_lines: bool = False
    """Skip (and count) malformed rows and pairs with identical responses instead of stopping."""

    # Precision and device.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype; auto is bfloat16 on GPUs and float32 on CPUs."""
    mixed_precision: bool = True
    """Keep float32 master weights and compute in `dtype` (False: parameters in `dtype`)."""
    device: str = "auto"

    # Length of the run.
    max_num_steps: int = 100
    max_num_data_epochs: int | None = None
    seed: int = 2

    # Optimizer and schedule.
    learning_rate: float = 1e-4
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
    loss_chunk_size: int = 1024
    """Response tokens per chunk of the log-probabilities, so full-vocabulary fp32 logits never exist at once."""

    # Parallelism (torchrun / Slurm / one process).
    data_parallelism: Literal["fsdp", "ddp"] = "fsdp"
    tensor_parallel_size: int = 1
    fsdp_reshard_after_forward: bool = True
    fsdp_replicas: int = 1
    """HSDP: replicate across this many groups and shard within each (1: plain FSDP)."""

    # The loss.
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    """`criterion.name` (dpo, simpo, orpo, cpo) and each one's section: `criterion.dpo.beta`, ..."""
    reference_save_every_n_rounds: int = 50
    """The reference pass saves its progress every this many rounds of micro-batches (one per dp rank)."""

    # LoRA / QLoRA (off: full fine-tuning).
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapters on a frozen base: `lora.enabled=true`, `lora.rank`, `lora.alpha`, ...; the DPO
    reference is then the base (the adapters start at zero)."""

    # Checkpoints.
    checkpoint_every_n_steps: int = 1000
    keep_last_n_checkpoints: int | None = 1
    keep_last_n_models: int | None = None
    save_model_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
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
    # the saved optimizer, schedule base, data position, grad scaler and reference pass depend on them.
    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = (
        "learning_rate", "betas", "eps", "weight_decay", "max_seq_len", "max_num_tokens", "packing",
        "gradient_accumulation", "seed", "dtype", "mixed_precision", "criterion",
    )

    def __post_init__(self) -> None:
        LR_SCHEDULES.get(self.lr_schedule, key="lr_schedule")
        check_recorder_names(self.metric_recorders, key="metric_recorders")
        check_lora_config(self.lora)
        _check_optimizer_values(self)

    def check(self) -> None:
        """Settings that cannot work together, caught before any work starts."""
        if self.dataset is None:
            raise ConfigError("config key 'dataset' is required: a card name, a .jsonl file or a directory of "
                              "preference rows (src/tgt_chosen/tgt_rejected or prompt/chosen/rejected)")
        positive = ["max_seq_len", "max_num_tokens", "max_num_steps", "gradient_accumulation", "checkpoint_every_n_steps",
                    "publish_metrics_every_n_steps", "tensor_parallel_size", "fsdp_replicas", "loss_chunk_size",
                    "reference_save_every_n_rounds"]
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{key}' must be at least 1, got {getattr(self, key)}")
        for key in ("keep_last_n_checkpoints", "keep_last_n_models", "validate_every_n_steps", "max_num_data_epochs"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"config key '{key}' must be at least 1 or null, got {value}")
        if self.max_num_tokens < 2 * self.max_seq_len:
            raise ConfigError(
                f"config key 'max_num_tokens' ({self.max_num_tokens}) must be at least 2 x max_seq_len "
                f"({2 * self.max_seq_len}): a micro-batch holds both sequences of a pair"
            )
        if self.data_parallelism == "ddp" and self.fsdp_replicas > 1:
            raise ConfigError(f"config key 'fsdp_replicas' ({self.fsdp_replicas}) needs data_parallelism=fsdp")
