"""What the language-model recipes share: dtypes, which model and tokenizer a
config names, run logging.

`model` in a recipe config is a card name, a checkpoint path, or, with a
`checkpoint_dir`, `last_checkpoint` / `checkpoint_step_N` of an earlier run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ft.errors import ConfigError, FtError
from ft.models import model_config_from_card
from ft.models.llama.checkpoint import read_checkpoint_config
from ft.models.llama.model import LlamaConfig
from ft.training.checkpoint import resolve_model_checkpoint

log = logging.getLogger("ft")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"config key 'dtype': unknown dtype {name!r}; known: auto, {', '.join(DTYPES)}") from None


@dataclass(frozen=True)
class ModelSource:
    """Where a recipe's model comes from."""

    description: str
    config: LlamaConfig
    checkpoint: Path | None  # None: random initialisation
    card_name: str | None = None


def resolve_model_source(model: str, *, checkpoint_dir: str | None = None) -> ModelSource:
    """The model a config names: a card, a checkpoint path, or a step of `checkpoint_dir`."""
    if checkpoint_dir is not None:
        step_dir = resolve_model_checkpoint(Path(checkpoint_dir).expanduser(), model)
        return ModelSource(f"{step_dir}", read_checkpoint_config(step_dir), step_dir)
    if model in ("last_checkpoint",) or model.startswith("checkpoint_step_"):
        raise ConfigError(
            f"config key 'model': {model!r} names a checkpoint of an earlier run; "
            f"also set resume_checkpoint_dir (instruction_finetune) or checkpoint_dir (generate)"
        )
    path = Path(model).expanduser()
    if os.sep in model or path.exists():
        if not path.exists():
            raise FtError(f"config key 'model': checkpoint path {path} does not exist")
        return ModelSource(str(path), read_checkpoint_config(path), path)
    from ft.assets import load_card

    card = load_card(model)
    config = model_config_from_card(card)
    checkpoint = card.path("checkpoint") if card.get("checkpoint") else None
    if config is None:
        if checkpoint is None:
            raise FtError(f"card {card.name!r} names neither a model_arch nor a checkpoint")
        config = read_checkpoint_config(checkpoint)
    return ModelSource(f"card {card.name!r}", config, checkpoint, card_name=card.name)


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
