"""What the language-model recipes share: which model and tokenizer a config
names (checked against each other, the parallel layout and LoRA), the checkpoint
directory, metric recorders, run logging, instruction data read into batches (and
`DTYPES` / `resolve_dtype`, re-exported from `ft.dtypes`).

`model` in a recipe config is a card name, a checkpoint path, or, with a
`checkpoint_dir`, `last_checkpoint` / `checkpoint_step_N` of an earlier run.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ft.dtypes import DTYPES, resolve_dtype  # noqa: F401  (re-exported for the recipes)
from ft.data import BatchReader, iter_validation_batches, read_examples
from ft.data.target_mask_guard import check_target_masks
from ft.errors import ConfigError
from ft.gang import Gangs
from ft.models import ModelSource, resolve_model
from ft.models.checkpoint import read_checkpoint_config
from ft.training.checkpoint import CheckpointManager, resolve_model_checkpoint

log = logging.getLogger("ft")


def resolve_model_source(model: str, *, checkpoint_dir: str | None = None) -> ModelSource:
    """The model a config names: a card, a checkpoint path, or a step of `checkpoint_dir`."""
    from ft.assets.resolve import is_explicit_path
    from ft.lora.adapter_model import adapter_source, is_adapter_dir

    if checkpoint_dir is not None:
        step_dir = resolve_model_checkpoint(Path(checkpoint_dir).expanduser(), model)
        if is_adapter_dir(step_dir):  # a LoRA run's step: its adapter on the base it records
            return adapter_source(step_dir)
        return ModelSource(f"{step_dir}", read_checkpoint_config(step_dir), step_dir)
    if is_explicit_path(model) and is_adapter_dir(model):
        return adapter_source(model)
    if model in ("last_checkpoint",) or model.startswith("checkpoint_step_"):
        raise ConfigError(
            f"config key 'model': {model!r} names a checkpoint of an earlier run; "
            f"also set resume_checkpoint_dir (instruction_finetune) or checkpoint_dir (generate)"
        )
    return resolve_model(model)


def resolve_tokenizer(tokenizer: str | None, source: ModelSource):
    """The tokenizer a config names, else the model card's, else the one saved beside the checkpoint."""
    from ft.tokenizers import load_tokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if source.card_name is not None:
        return load_tokenizer(source.card_name)
    if source.checkpoint is not None:
        directory = source.checkpoint if source.checkpoint.is_dir() else source.checkpoint.parent
        return load_tokenizer(str(directory))
    raise ConfigError("config key 'tokenizer': no tokenizer given and the model names none")


def resolve_model_and_tokenizer(config, gangs: Gangs):
    """(model source, tokenizer, LoRA section or None) of a training config
    (`ft.recipes.lm_training_config.LmTrainingConfig`), checked before any weights load."""
    from ft.lora.training import check_lora_run
    from ft.models.parallelize import check_parallel_layout

    source = resolve_model_source(config.model, checkpoint_dir=config.resume_checkpoint_dir)
    tokenizer = resolve_tokenizer(config.tokenizer, source)
    check_parallel_layout(source.config, tensor_parallel_size=config.tensor_parallel_size,
                          data_parallelism=config.data_parallelism,
                          activation_checkpointing=config.activation_checkpointing,
                          activation_checkpointing_blocks=config.activation_checkpointing_blocks)
    check_model_vocabulary(tokenizer, source)
    lora = config.lora if config.lora.enabled else None
    if lora is not None:
        check_lora_run(lora, source=source, dp_size=gangs.dp.size, tp_size=gangs.tp.size, pp_size=gangs.pp.size,
                       data_parallelism=config.data_parallelism, fsdp_replicas=config.fsdp_replicas,
                       fp8=getattr(config, "fp8", "none"))  # preference tuning has no fp8 key
    return source, tokenizer, lora


def check_model_vocabulary(tokenizer, source: ModelSource) -> None:
    """A tokenizer with ids past the model's embedding table would index out of range."""
    if tokenizer.vocab_size > source.config.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} tokens but model {source.description} only {source.config.vocab_size}"
        )


def open_checkpoints(config, output_dir: Path, gangs: Gangs, *, lora, **options) -> tuple[CheckpointManager, int | None]:
    """OUT/checkpoints without any incomplete save, and the step to resume from (None: a fresh run).
    `options`: further `CheckpointManager` settings of the recipe."""
    checkpoints = CheckpointManager(
        output_dir / "checkpoints", is_main=gangs.is_main, barrier=gangs.root.barrier,
        keep_last_n_checkpoints=config.keep_last_n_checkpoints, keep_last_n_models=config.keep_last_n_models,
        trainable_only=lora is not None, **options,
    )
    checkpoints.remove_incomplete()
    return checkpoints, checkpoints.latest_resumable_step()


def checkpoint_model_config(source: ModelSource, lora) -> dict:
    """What a checkpoint records of the model: its config and, under LoRA, the adapter settings,
    so a LoRA run never resumes as full fine-tuning, or the reverse."""
    from ft.lora.training import lora_fingerprint

    model_config = dataclasses.asdict(source.config)
    if lora is not None:
        model_config["lora"] = lora_fingerprint(lora)
    return model_config


def start_trainer_state(config, *, model, optimizer, reader, source: ModelSource, lora, checkpoints: CheckpointManager,
                        resume_step: int | None, dtype, device):
    """(schedule, trainer state, the model config checkpoints record): the state at step 0, or
    loaded with the model and optimizer from checkpoint `resume_step`."""
    import torch

    from ft.training.optim import build_scheduler
    from ft.training.trainer_state import TrainerState

    scheduler = build_scheduler(
        optimizer, schedule=config.lr_schedule, warmup_steps=config.warmup_steps, max_num_steps=config.max_num_steps,
        final_lr_scale=config.final_lr_scale,
    )
    state = TrainerState(step=0, scheduler=scheduler, reader=reader,
                         scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))
    model_config = checkpoint_model_config(source, lora)
    if resume_step is not None:
        log.info("resuming from %s", checkpoints.dir / f"step_{resume_step}")
        extra = checkpoints.load(resume_step, model=model, optimizer=optimizer, model_config=model_config)
        state.load_state_dict(extra, device)
    return scheduler, state, model_config


def open_metric_recorders(config, output_dir: Path, gangs: Gangs, *, start_step: int):
    """The run's `MetricBag` on rank 0 (None on the other ranks), recording the whole config."""
    from ft.config import config_to_dict
    from ft.training.metrics import MetricBag

    if not gangs.is_main:
        return None
    return MetricBag(output_dir, config.metric_recorders, wandb_project=config.wandb_project,
                     config=config_to_dict(config), start_step=start_step)


def setup_run_logging(output_dir: Path, rank: int) -> Path:
    """Every rank logs to OUT/logs/rank_K.log; only rank 0 also prints."""
    log_dir = output_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"rank_{rank}.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("ft")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    if rank != 0:
        # Keep other ranks off the console; their file handler still records everything.
        root.propagate = False
    return log_file


def read_sft_data(config, tokenizer, gangs: Gangs):
    """The training batch reader and the validation examples (None without validation)
    of an instruction-tuning config (dataset, splits, lengths, packing, batching keys)."""
    def read(split: str):
        return read_examples(
            config.dataset, tokenizer, split=split, format=_format(config), max_seq_len=config.max_seq_len,
            on_too_long=config.example_too_long, skip_malformed=config.skip_malformed_lines,
        )

    train_examples = read(config.train_split)
    check_target_masks(train_examples)  # a mask over whole dialogs would train on the prompts
    log.info("train data (%s): %s", train_examples.source.description, train_examples.stats.summary())
    valid_examples = read(config.valid_split) if config.validate_every_n_steps is not None else None
    reader = BatchReader(
        train_examples, max_seq_len=config.max_seq_len, max_num_tokens=config.max_num_tokens, seed=config.seed,
        packing=config.packing, max_num_data_epochs=config.max_num_data_epochs, dp_size=gangs.dp.size,
        dp_rank=gangs.dp.rank, gradient_accumulation=config.gradient_accumulation,
        pad_id=pad_id(tokenizer),
    )
    return reader, valid_examples


def sft_validation_batches(config, examples, gangs: Gangs, pad_id: int):
    return iter_validation_batches(examples, max_seq_len=config.max_seq_len, max_num_tokens=config.max_num_tokens,
                                   packing=config.packing, dp_size=gangs.dp.size, dp_rank=gangs.dp.rank, pad_id=pad_id)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_id if tokenizer.pad_id is not None else 0


def _format(config) -> str | None:
    return None if config.dataset_format == "auto" else config.dataset_format
