"""The config of `ft lm generate`: every key a user can set (the `generator_config`
section is `ft.generation.generator_config.GeneratorConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ft.generation.generator_config import GeneratorConfig


@dataclass(kw_only=True)
class GenerateConfig:
    model: str | None = None
    """A model card, a checkpoint path, or with checkpoint_dir: last_checkpoint / checkpoint_step_N
    (a LoRA run's step runs its adapter on its base). Default: ft_tiny, or with lora_dir the adapter's base."""
    lora_dir: str | None = None
    """A LoRA adapter directory (PEFT format, e.g. a LoRA run's OUT/checkpoints/step_N) to run on `model`."""
    checkpoint_dir: str | None = None
    """OUT/checkpoints of a training run, for model=last_checkpoint|checkpoint_step_N."""
    tokenizer: str | None = None
    """Default: the model card's tokenizer, or the one saved beside the checkpoint."""
    dataset: str = "ft_default_sft"
    """A dataset card, a directory of splits, or one JSONL file."""
    split: str = "test"
    """Split of a dataset directory or card (a single file is read whole)."""
    dtype: str = "auto"
    device: str = "auto"
    tensor_parallel_size: int = 1
    generator_config: GeneratorConfig = field(default_factory=GeneratorConfig)


__all__ = ["GenerateConfig"]
