"""`ft <family> write_hf_config --model ARCH DIR`, for every registered family: make
a directory of HF-layout safetensors (an ft step dir) loadable by transformers and
vLLM by writing its `config.json` and `generation_config.json`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from ft.cli.command import Command
from ft.dtypes import DTYPES
from ft.errors import AssetError, ConfigError, FtError
from ft.models.checkpoint import check_hf_dir_matches, checkpoint_dtype
from ft.models.family import ModelFamily
from ft.models.hf_export import write_hf_config

log = logging.getLogger("ft")


def resolve_family_config(family: ModelFamily, name: str) -> Any:
    """An arch of `family`, else a model card naming one (with its model_config)."""
    if name in family.archs:
        return family.archs.get(name)
    from ft.assets import load_card
    from ft.models.build import model_config_from_card

    known = ", ".join(family.archs.names())
    try:
        card = load_card(name)
    except AssetError:
        raise FtError(f"unknown model {name!r}: neither a {family.name} arch nor a model card; known archs: {known}") from None
    config = model_config_from_card(card)
    if config is None:
        raise ConfigError(f"card {name!r} names no model_arch; pass an arch instead, one of: {known}")
    if not isinstance(config, family.config_class):
        raise ConfigError(f"card {name!r} is not a {family.name} model; use `ft <its family> write_hf_config`")
    return config


def write_hf_config_command(family: ModelFamily) -> Command:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True, metavar="ARCH",
                            help=f"a {family.name} arch (e.g. {family.archs.names()[0]}) or a model card name")
        parser.add_argument(
            "--dtype", choices=sorted(DTYPES), default=None,
            help="torch_dtype to record (default: the dtype of the safetensors in DIR, else bfloat16)",
        )
        parser.add_argument("dir", type=Path, metavar="DIR", help="directory holding the model's *.safetensors")

    def run(args: argparse.Namespace) -> int:
        directory: Path = args.dir
        if not directory.is_dir():
            raise FtError(f"{directory} is not a directory; pass the directory that holds the model's *.safetensors")
        config = resolve_family_config(family, args.model)
        has_weights = any(directory.glob("*.safetensors"))
        if has_weights:
            # Fails early when the arch does not fit the weights, instead of writing a
            # config.json that transformers would reject (or worse, half-load).
            check_hf_dir_matches(config, directory)
        if args.dtype is not None:
            dtype = DTYPES[args.dtype]
        elif has_weights:
            dtype = checkpoint_dtype(directory)
        else:
            dtype = torch.bfloat16
        write_hf_config(config, directory, dtype=dtype)
        log.info("wrote config.json and generation_config.json to %s", directory)
        return 0

    return Command(
        help=f"write HF config.json + generation_config.json for a directory of {family.name} safetensors",
        add_arguments=add_arguments,
        run=run,
    )
