"""`ft llama write_hf_config --model ARCH DIR`: make a directory of HF-layout
safetensors (an ft step dir) loadable by transformers and vLLM by writing its
`config.json` and `generation_config.json`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from ft.cli import Command
from ft.errors import AssetError, ConfigError, FtError
from ft.models.llama.checkpoint import check_hf_dir_matches, checkpoint_dtype
from ft.models.llama.hf import write_hf_config
from ft.models.llama.model import LLAMA_ARCHS, LlamaConfig

log = logging.getLogger("ft")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="ARCH", help="a Llama arch (e.g. llama3_2_1b) or a model card name")
    parser.add_argument(
        "--dtype", choices=sorted(_DTYPES), default=None,
        help="torch_dtype to record (default: the dtype of the safetensors in DIR, else bfloat16)",
    )
    parser.add_argument("dir", type=Path, metavar="DIR", help="directory holding the model's *.safetensors")


def resolve_model_config(name: str) -> LlamaConfig:
    """An arch name, else a model card naming an arch (with its model_config)."""
    if name in LLAMA_ARCHS:
        return LLAMA_ARCHS[name]
    from ft.assets import load_card
    from ft.models import model_config_from_card

    known = ", ".join(sorted(LLAMA_ARCHS))
    try:
        card = load_card(name)
    except AssetError:
        raise FtError(f"unknown model {name!r}: neither a Llama arch nor a model card; known archs: {known}") from None
    config = model_config_from_card(card)
    if config is None:
        raise ConfigError(f"card {name!r} names no model_arch; pass an arch instead, one of: {known}")
    return config


def _run(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    if not directory.is_dir():
        raise FtError(f"{directory} is not a directory; pass the directory that holds the model's *.safetensors")
    config = resolve_model_config(args.model)
    has_weights = any(directory.glob("*.safetensors"))
    if has_weights:
        # Fails early when the arch does not fit the weights, instead of writing a
        # config.json that transformers would reject (or worse, half-load).
        check_hf_dir_matches(config, directory)
    if args.dtype is not None:
        dtype = _DTYPES[args.dtype]
    elif has_weights:
        dtype = checkpoint_dtype(directory)
    else:
        dtype = torch.bfloat16
    write_hf_config(config, directory, dtype=dtype)
    log.info("wrote config.json and generation_config.json to %s", directory)
    return 0


WRITE_HF_CONFIG_COMMAND = Command(
    help="write HF config.json + generation_config.json for a directory of Llama safetensors",
    add_arguments=_add_arguments,
    run=_run,
)
