"""`ft <family> write_hf_config [--model NAME] DIR`, for every registered family: make
a directory of HF-layout safetensors (an ft step dir) loadable by transformers and
vLLM by writing its `config.json` and `generation_config.json`.

The command is built from the family's name (`ft.models.family_names`): the family
and everything that imports torch are imported when it runs, not for `--help`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ft.cli.command import Command
from ft.dtype_names import DTYPE_NAMES
from ft.errors import ConfigError, FtError
from ft.models.family_names import family_names

if TYPE_CHECKING:
    from ft.models.family import ModelFamily

log = logging.getLogger("ft")


def resolve_family_config(family: ModelFamily, name: str, *, recorded: Any = None) -> Any:
    """The config `--model NAME` names, resolved as training resolves `model=NAME`.

    A model card first (with its `@user` overlay and `model_config`), then an arch
    of `family`. A card without an arch (a family card such as `llama3`) or the
    family's own name stands for the config the checkpoint records (`recorded`),
    after checking that it is of that family.
    """
    from ft.assets import AssetStore
    from ft.models.build import model_config_from_card

    known = ", ".join(family.archs.names())
    store = AssetStore.default()
    card = store.load(name) if name in store else None
    if card is not None:
        config = model_config_from_card(card)
        if config is None:
            card_family = card.get("model_family")
            if card_family is None:
                raise ConfigError(f"card {name!r} names no model_arch or model_family; pass an arch: {known}")
            if card_family != family.name:
                raise ConfigError(f"card {name!r} is a {card_family} model; use `ft {card_family} write_hf_config`")
            return _recorded_or_error(family, recorded, what=f"card {name!r} names no arch")
    elif name == family.name:
        return _recorded_or_error(family, recorded, what=f"{name!r} is a family, not an arch")
    elif name in family.archs:
        config = family.archs.get(name)
    else:
        raise FtError(f"unknown model {name!r}: neither a model card nor a {family.name} arch; known archs: {known}")
    if not isinstance(config, family.config_class):
        raise ConfigError(f"card {name!r} is not a {family.name} model; use `ft <its family> write_hf_config`")
    return config


def _recorded_or_error(family: ModelFamily, recorded: Any, *, what: str) -> Any:
    from ft.models.family import family_of

    if recorded is None:
        raise ConfigError(f"{what}, and the directory records no model config (config.json or "
                          f"trainer/model_config.json); pass an arch, one of: {', '.join(family.archs.names())}")
    if not isinstance(recorded, family.config_class):
        raise ConfigError(f"the directory holds a {family_of(recorded).name} model, not a {family.name} model; "
                          f"use `ft {family_of(recorded).name} write_hf_config`")
    return recorded


def recorded_config(directory: Path) -> Any | None:
    """The model config a checkpoint directory records: its config.json, else the
    trainer state's model_config.json (an ft step dir); None when it records none."""
    from ft.config import dict_to_config
    from ft.models.checkpoint import read_checkpoint_config
    from ft.models.family import all_families

    if (directory / "config.json").is_file():
        return read_checkpoint_config(directory)
    saved = directory / "trainer" / "model_config.json"
    if not saved.is_file():
        return None
    values = json.loads(saved.read_text())
    for family in all_families():
        try:
            return dict_to_config(family.config_class, values)
        except (ConfigError, TypeError):
            continue
    raise ConfigError(f"{saved}: no registered model family has these config keys; pass --model ARCH")


def _run_tokenizer(directory: Path) -> Any:
    """The tokenizer saved beside the weights (its ids go into the config), if any."""
    from ft.tokenizers import load_tokenizer

    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "original/tokenizer.model")):
        return None
    try:
        return load_tokenizer(directory)
    except FtError as error:
        log.warning("not using the tokenizer in %s for the special-token ids: %s", directory, error)
        return None


def write_hf_config_command(family_name: str) -> Command:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", default=None, metavar="NAME",
                            help=f"a model card (resolved as training does), a {family_name} arch "
                                 f"(e.g. {family_names()[family_name]}) or a family card such as llama3; "
                                 "default: the config the checkpoint records")
        parser.add_argument(
            "--dtype", choices=sorted(DTYPE_NAMES), default=None,
            help="torch_dtype to record (default: the dtype of the safetensors in DIR, else bfloat16)",
        )
        parser.add_argument("dir", type=Path, metavar="DIR", help="directory holding the model's *.safetensors")

    def run(args: argparse.Namespace) -> int:
        import torch

        from ft.dtypes import DTYPES
        from ft.models.checkpoint import check_hf_dir_matches, checkpoint_dtype
        from ft.models.family import get_family
        from ft.models.hf_export import write_hf_config

        family = get_family(family_name)
        directory: Path = args.dir
        if not directory.is_dir():
            raise FtError(f"{directory} is not a directory; pass the directory that holds the model's *.safetensors")
        recorded = recorded_config(directory)
        if args.model is None:
            config = _recorded_or_error(family, recorded, what="no --model given")
        else:
            config = resolve_family_config(family, args.model, recorded=recorded)
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
        write_hf_config(config, directory, dtype=dtype, tokenizer=_run_tokenizer(directory))
        log.info("wrote config.json and generation_config.json to %s", directory)
        return 0

    return Command(
        help=f"write HF config.json + generation_config.json for a directory of {family_name} safetensors",
        add_arguments=add_arguments,
        run=run,
    )
