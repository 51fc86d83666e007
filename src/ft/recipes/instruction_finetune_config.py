"""The config of `ft lm instruction_finetune`: every key a user can set.

Key names follow fairseq2's instruction fine-tuning tutorial; the keys shared with
the other training recipes are declared in `ft.recipes.lm_training_config`. The
defaults train the embedded default (tiny model, tokenizer, dataset) on a CPU in
about a minute; for a real model set at least `model`, `dataset`, `dtype`,
`learning_rate` and `max_num_steps`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from ft.errors import ConfigError
from ft.lora.config import check_float8_base_layout
from ft.recipes.lm_training_config import LmTrainingConfig

if TYPE_CHECKING:
    from ft.training.optimizers import OptimizerSettings


@dataclass(kw_only=True)
class InstructionFinetuneConfig(LmTrainingConfig):
    """The keys of `LmTrainingConfig` (model, data, lengths, precision, optimizer,
    parallelism, LoRA, checkpoints, metrics), then these."""

    # Data.
    dataset_format: str = "auto"
    """`auto` (detect per row) or a registered format (`ft.data.DATA_FORMATS`)."""

    # Memory and speed.
    fp8: Literal["none", "tensorwise", "rowwise"] = "none"
    """Linear layers in float8 through torchao (CUDA, compute capability >= 8.9): `tensorwise` (fastest) or
    `rowwise` scaling; the output projection stays in `dtype` (`ft.models.fp8`). With LoRA: the frozen base
    linears are cast to float8 once and run forward and input gradient in float8, one process
    (`ft.lora.float8_base`)."""
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
    """Move saved activations to pinned host memory during forward and back for backward, prefetched (CUDA; no-op
    on a CPU). With activation_checkpointing=full that is each block's input: the blocks keep none on the GPU."""
    max_memory_gib: float | None = None
    """GPU memory to plan for (`--dry-run` says whether the run fits); default: the GPU's memory."""

    # Parallelism (torchrun / Slurm / one process).
    pipeline_parallel_size: int = 1
    """Pipeline stages: the decoder blocks split over this many ranks; gradient_accumulation micro-batches per
    step go through the pipeline (at least pipeline_parallel_size of them)."""
    pipeline_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"] = "1f1b"
    """The pipeline schedule; interleaved_1f1b and zero_bubble run two stages per rank."""
    sequence_parallel: bool = False
    """With tensor_parallel_size > 1: norms and the residual stream sharded over the sequence between blocks
    (not with pipeline_parallel_size > 1 yet)."""
    async_tensor_parallel: bool = False
    """With sequence_parallel, compile and CUDA GPUs: overlap TP's all-gathers and reduce-scatters with the
    matmuls (torch's micro-pipeline TP pass, symmetric memory)."""
    parallel_plan: Literal["manual", "auto"] = "manual"
    """auto: choose data/tensor/pipeline parallel sizes, activation checkpointing and optimizer offload from the
    model, the processes, GPU memory, max_num_tokens and max_seq_len (keys set away from their defaults are kept)."""

    POSITIVE_KEYS: ClassVar[tuple[str, ...]] = LmTrainingConfig.POSITIVE_KEYS + ("pipeline_parallel_size",)

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
        # The registries import torch; `--help` reads this class without it.
        from ft.data.formats import check_format_name
        from ft.training.optimizers import check_optimizer_settings

        check_format_name(self.dataset_format, key="dataset_format")
        super().__post_init__()
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
        super().check()
        if self.max_num_tokens < self.max_seq_len:
            raise ConfigError(
                f"config key 'max_num_tokens' ({self.max_num_tokens}) must be at least max_seq_len "
                f"({self.max_seq_len}): a batch holds whole rows"
            )
        check_pipeline_settings(self)
        if self.lora.enabled and self.fp8 != "none":  # the data-parallel size is checked when the gangs exist
            check_float8_base_layout(self.lora, self.fp8, tensor_parallel_size=self.tensor_parallel_size,
                                     pipeline_parallel_size=self.pipeline_parallel_size,
                                     fsdp_replicas=self.fsdp_replicas)
        if self.data_parallelism == "ddp" and self.fsdp_replicas > 1:
            raise ConfigError(f"config key 'fsdp_replicas' ({self.fsdp_replicas}) needs data_parallelism=fsdp "
                              f"(HSDP shards within replicas); DDP replicates over all ranks: use fsdp_replicas=1")


def check_pipeline_settings(config: InstructionFinetuneConfig) -> None:
    """What pipeline stages and sequence parallelism do not combine with (yet)."""
    if config.sequence_parallel and config.tensor_parallel_size == 1 and config.parallel_plan == "manual":
        raise ConfigError("config key 'sequence_parallel' needs tensor_parallel_size > 1 (it shards TP's norms)")
    if config.pipeline_parallel_size == 1:
        return
    if config.sequence_parallel:  # stages send whole-sequence hidden states; sequence parallelism shards them
        raise ConfigError(f"config keys 'sequence_parallel' and 'pipeline_parallel_size' "
                          f"({config.pipeline_parallel_size}) do not combine yet; use sequence_parallel=false "
                          f"with pipeline stages")
    if config.lora.enabled and config.lora.base_quantization == "nf4":  # NF4 weights are not split into stages yet
        raise ConfigError(f"config key 'lora.base_quantization' (nf4, QLoRA) cannot be combined with "
                          f"pipeline_parallel_size={config.pipeline_parallel_size}: NF4 base weights are not split into "
                          f"stages (QLoRA runs on one process or under FSDP2); use "
                          f"lora.base_quantization=none (the frozen base in dtype) with pipeline stages, or "
                          f"pipeline_parallel_size=1")
    if config.activation_checkpointing_blocks is not None:  # which blocks would count: each stage's or the model's?
        raise ConfigError(f"config key 'activation_checkpointing_blocks' ({config.activation_checkpointing_blocks}) "
                          f"cannot be combined with pipeline_parallel_size={config.pipeline_parallel_size}: leave it "
                          f"null (every block checkpointed), or use pipeline_parallel_size=1")
    for key, bad in (("optimizer_in_backward", config.optimizer_in_backward),
                     ("activation_offloading", config.activation_offloading),
                     ("data_parallelism=ddp", config.data_parallelism == "ddp")):
        if bad:
            raise ConfigError(f"config key '{key.split('=')[0]}' cannot be combined with pipeline_parallel_size="
                              f"{config.pipeline_parallel_size}; use pipeline_parallel_size=1")


def optimizer_settings(config: InstructionFinetuneConfig) -> OptimizerSettings:
    """The optimizer section of the config, as `ft.training.optimizers.build_optimizer` takes it."""
    from ft.training.optimizers import OptimizerSettings

    return OptimizerSettings(
        name=config.optimizer, learning_rate=config.learning_rate, betas=config.betas, eps=config.eps,
        weight_decay=config.weight_decay, in_backward=config.optimizer_in_backward,
        cpu_offload=config.optimizer_cpu_offload, stochastic_rounding=config.bf16_stochastic_rounding, seed=config.seed,
    )
