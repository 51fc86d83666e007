"""`ft lm merge_lora`: merge a LoRA adapter into its base and write a Hugging Face model
directory that `transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads as is.

    ft lm merge_lora OUT --config lora_dir=RUN/checkpoints/step_1000 [model=BASE] [dtype=bfloat16]

The adapter is in the PEFT format (a LoRA run's step directory, or one PEFT wrote);
the base defaults to the one it records. The merge is `ft.lora.merge.merge_adapter`
(one tensor at a time, from the base checkpoint at the precision it stores), the same
as a run's `lora.export_merged`; OUT is written whole or not at all
(`ft.lora.merge_output`). Importing this module loads no torch: the verb's modules
are imported when it runs, so `ft --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ft.cli.command import Command
from ft.errors import CheckpointError, ConfigError, FtError

log = logging.getLogger("ft")

RUN_CONFIG = "config.yaml"  # what a training run records in OUT (`ft.recipes.run_config`)


@dataclass(kw_only=True)
class MergeLoraConfig:
    lora_dir: str | None = None
    """The LoRA adapter to merge (required): a LoRA run's OUT/checkpoints/step_N, or any directory
    holding a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)."""
    model: str | None = None
    """The base: a model card or a checkpoint path. Default: the base the adapter records
    (base_model_name_or_path: the card or path the run trained on)."""
    tokenizer: str | None = None
    """Saved beside the weights (its special-token ids go into config.json). Default: the tokenizer
    the LoRA run recorded, else the base card's or the one beside the base checkpoint, if any."""
    dtype: str = "auto"
    """dtype of the merged weights: float32, bfloat16, float16, or auto (the dtype the base checkpoint stores)."""


def merge_lora(config: MergeLoraConfig, out: Path) -> int:
    """Merge `config.lora_dir` into its base and write the HF directory `out`."""
    import torch

    from ft.dtypes import dtype_name, resolve_dtype
    from ft.lora.adapter_model import adapter_source, recorded_base
    from ft.lora.merge import merge_adapter
    from ft.lora.merge_output import check_output_dir, write_merged_dir
    from ft.models.checkpoint import checkpoint_dtype

    adapter_dir = _adapter_dir(config.lora_dir)
    # An unknown name fails before anything is read; auto is the base's, known once it is resolved.
    dtype = None if config.dtype == "auto" else resolve_dtype(config.dtype, torch.device("cpu"))
    _check_model_is_no_adapter(config.model)
    source = adapter_source(adapter_dir, base=config.model)
    base = config.model or recorded_base(adapter_dir)
    out = out.expanduser()
    _check_not_an_input(out, adapter=adapter_dir, checkpoint=source.checkpoint)
    check_output_dir(out)
    dtype = dtype or checkpoint_dtype(source.checkpoint)
    tokenizer = _tokenizer(config.tokenizer, adapter_dir, source)
    log.info("merging %s as %s", source.description, dtype_name(dtype))
    write_merged_dir(
        out, lambda directory: merge_adapter(base, adapter_dir, directory, dtype=dtype, tokenizer=tokenizer),
        {"adapter": str(adapter_dir.resolve()), "base": base, "dtype": dtype_name(dtype)},
    )
    log.info("merged model written to %s", out)
    return 0


def _adapter_dir(lora_dir: str | None) -> Path:
    """The adapter directory `lora_dir` names, or an error saying what it is instead."""
    from ft.lora.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from ft.training.run_dirs import list_step_dirs

    if not lora_dir:
        raise ConfigError("config key 'lora_dir' is required: the LoRA adapter to merge, e.g. "
                          "lora_dir=OUT/checkpoints/step_1000")
    directory = Path(lora_dir).expanduser()
    if not directory.is_dir():
        what = "does not exist" if not directory.exists() else "is not a directory"
        raise CheckpointError(f"config key 'lora_dir': {directory} {what}")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if (directory / name).is_file():
            continue
        hint = ""
        steps = list_step_dirs(directory) or list_step_dirs(directory / "checkpoints")
        if steps:
            hint = f"; it holds a run's checkpoints: pass one of their steps, e.g. lora_dir={list(steps.values())[-1]}"
        elif (directory / "config.json").is_file():
            hint = "; it holds a full model (config.json), which needs no merge"
        raise CheckpointError(f"config key 'lora_dir': {directory} is not a LoRA adapter directory "
                              f"({name} is missing){hint}")
    return directory


def _check_model_is_no_adapter(model: str | None) -> None:
    from ft.assets.resolve import is_explicit_path
    from ft.lora.adapter_model import is_adapter_dir

    if model is not None and is_explicit_path(model) and is_adapter_dir(model):
        raise ConfigError(f"config key 'model': {model} is a LoRA adapter; pass it as lora_dir={model} "
                          "(model names the base to merge it into; default: the base the adapter records)")


def _check_not_an_input(out: Path, *, adapter: Path, checkpoint: Path) -> None:
    """The merge replaces OUT: it must not be (or hold) what the merge reads."""
    target = out.resolve()
    for what, path in (("the LoRA adapter", adapter), ("the base checkpoint", checkpoint)):
        path = path.resolve()
        if path == target:
            raise ConfigError(f"OUT {out} is {what}; write the merged model to a new directory")
        if target in path.parents:
            raise ConfigError(f"OUT {out} holds {what} ({path}); write the merged model to a new directory")


def _tokenizer(name: str | None, adapter_dir: Path, source: Any) -> Any:
    """The tokenizer saved with the merged model (see `MergeLoraConfig.tokenizer`); None when
    neither the run nor the base has one."""
    from ft.recipes.lm_setup import check_model_vocabulary, resolve_tokenizer
    from ft.tokenizers import load_tokenizer

    recorded_in = None
    if name is None:
        name, recorded_in = _run_tokenizer(adapter_dir)
    if name is not None:
        try:
            tokenizer = load_tokenizer(name)
        except FtError as error:
            if recorded_in is None:
                raise
            raise type(error)(f"tokenizer {name!r}, recorded in {recorded_in}: {error}; pass tokenizer=...") from None
    else:
        try:
            tokenizer = resolve_tokenizer(None, source)
        except FtError as error:
            log.warning("the merged model gets no tokenizer files (%s); pass tokenizer=... to add them", error)
            return None
    check_model_vocabulary(tokenizer, source)
    return tokenizer


def _run_tokenizer(adapter_dir: Path) -> tuple[str | None, Path | None]:
    """(the `tokenizer` a LoRA run recorded in OUT/config.yaml, that file) for a run's
    OUT/checkpoints/step_N; (None, None) when there is no such record."""
    from ft.config import _read_config_file

    run_config = adapter_dir.parent.parent / RUN_CONFIG
    if adapter_dir.parent.name != "checkpoints" or not run_config.is_file():
        return None, None
    tokenizer = _read_config_file(run_config).get("tokenizer")
    return (tokenizer, run_config) if isinstance(tokenizer, str) and tokenizer else (None, None)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    from ft.recipes.config_help import format_keys_help

    # The recipes' flags (`ft.recipes.cli_support`) that mean something for a merge, worded the
    # same: a merge has no presets, no dry run, and OUT is the model directory (no sweep dir).
    parser.add_argument("output_dir", metavar="OUT", nargs="?",
                        help="directory for the merged model: new, empty, or a merge ft wrote (replaced)")
    parser.add_argument("--config-file", action="append", metavar="FILE",
                        help="YAML config file; repeatable, later files override earlier ones")
    parser.add_argument("--config", action="append", nargs="+", metavar="KEY=VALUE",
                        help="config overrides, values parsed as YAML")
    parser.add_argument("--dump-config", action="store_true",
                        help="print the effective config as YAML, each value marked with where it came from, and exit")
    parser.add_argument("--explain", action="store_true", help="with --dump-config: a description above each key")
    parser.set_defaults(preset=None)  # `build_recipe_config` reads it; a merge has no presets
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = format_keys_help(MergeLoraConfig)


def _run(args: argparse.Namespace) -> int:
    from ft.recipes.cli_support import build_recipe_config
    from ft.recipes.config_help import annotated_dump

    config, origins = build_recipe_config(MergeLoraConfig, args, recipe="merge_lora")
    if args.dump_config:
        print(annotated_dump(config, origins, explain=args.explain), end="")
        return 0
    if args.output_dir is None:
        raise ConfigError("OUT is required: the directory for the merged model")
    return merge_lora(config, Path(args.output_dir))


MERGE_LORA_COMMAND = Command(
    help="merge a LoRA adapter into its base model and write a Hugging Face model directory",
    add_arguments=_add_arguments,
    run=_run,
)

__all__ = ["MERGE_LORA_COMMAND", "MergeLoraConfig", "merge_lora"]
