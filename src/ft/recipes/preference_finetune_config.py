"""The config of `ft lm preference_finetune`: every key a user can set.

The keys shared with `ft lm instruction_finetune` (model, data, lengths, precision,
optimizer, parallelism, LoRA, checkpoints, metrics) are declared in
`ft.recipes.lm_training_config`; the `criterion` section and its key names follow
fairseq2 0.4's preference recipes (`beta`, `nll_scale`, `length_normalization`,
`gamma`, `orpo_lambda`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ft.errors import ConfigError
from ft.lora.config import LoraConfig
from ft.preference.criterion_config import CriterionConfig
from ft.recipes.lm_training_config import LmTrainingConfig


@dataclass(kw_only=True)
class PreferenceFinetuneConfig(LmTrainingConfig):
    """The keys of `LmTrainingConfig` (model, data, lengths, precision, optimizer,
    parallelism, LoRA, checkpoints, metrics), with the defaults and descriptions
    redeclared here, then the loss."""

    dataset: str | None = None
    """Required. Preference rows (`ft.preference.data`): a dataset card name, a .jsonl file, or a
    directory of them (subfolders are splits)."""
    max_num_tokens: int = 2048
    """Tokens per micro-batch per rank (rows x max_seq_len); at least 2 x max_seq_len, since a
    micro-batch holds both sequences of a pair."""
    skip_malformed_lines: bool = False
    """Skip (and count) malformed rows and pairs with identical responses instead of stopping."""
    max_num_steps: int = 100
    learning_rate: float = 1e-4
    loss_chunk_size: int = 1024
    """Response tokens per chunk of the log-probabilities, so full-vocabulary fp32 logits never exist at once."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapters on a frozen base: `lora.enabled=true`, `lora.rank`, `lora.alpha`, ...; the DPO
    reference is then the base (the adapters start at zero)."""

    # The loss.
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    """`criterion.name` (dpo, simpo, orpo, cpo) and each one's section: `criterion.dpo.beta`, ..."""
    reference_save_every_n_rounds: int = 50
    """The reference pass saves its progress every this many rounds of micro-batches (one per dp rank)."""

    POSITIVE_KEYS: ClassVar[tuple[str, ...]] = LmTrainingConfig.POSITIVE_KEYS + ("reference_save_every_n_rounds",)

    # Resuming OUT with a different value of these is refused (ft.recipes.run_config):
    # the saved optimizer, schedule base, data position, grad scaler and reference pass depend on them.
    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = (
        "learning_rate", "betas", "eps", "weight_decay", "max_seq_len", "max_num_tokens", "packing",
        "gradient_accumulation", "seed", "dtype", "mixed_precision", "criterion",
    )

    def check(self) -> None:
        """Settings that cannot work together, caught before any work starts."""
        if self.dataset is None:
            raise ConfigError("config key 'dataset' is required: a card name, a .jsonl file or a directory of "
                              "preference rows (src/tgt_chosen/tgt_rejected or prompt/chosen/rejected)")
        super().check()
        if self.max_num_tokens < 2 * self.max_seq_len:
            raise ConfigError(
                f"config key 'max_num_tokens' ({self.max_num_tokens}) must be at least 2 x max_seq_len "
                f"({2 * self.max_seq_len}): a micro-batch holds both sequences of a pair"
            )
        if self.data_parallelism == "ddp" and self.fsdp_replicas > 1:
            raise ConfigError(f"config key 'fsdp_replicas' ({self.fsdp_replicas}) needs data_parallelism=fsdp")
