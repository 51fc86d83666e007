"""Presets: shipped YAML per recipe, listed with a line each, layered between the
defaults and the user's files/overrides, and every value's origin in --dump-config."""

from __future__ import annotations

import argparse

import pytest
import yaml

from ft.errors import ConfigError
from ft.recipes.cli_support import add_recipe_arguments, build_recipe_config
from ft.recipes.config_help import annotated_dump, field_docs, format_keys_help
from ft.recipes.instruction_finetune_config import InstructionFinetuneConfig
from ft.recipes.presets import format_preset_list, get_preset, list_presets


def args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_recipe_arguments(parser)
    return parser.parse_args(list(argv))


def test_every_shipped_preset_builds_and_suits_real_instruction_tuning():
    presets = list_presets("instruction_finetune")
    assert {p.name for p in presets} >= {"llama3_2_1b", "llama3_1_8b"}
    for preset in presets:
        assert preset.description
        config, _ = build_recipe_config(InstructionFinetuneConfig, args("--preset", preset.name),
                                        recipe="instruction_finetune")
        assert 5e-6 <= config.learning_rate <= 2e-5, preset.name
        assert config.max_seq_len >= 4096 and config.max_num_tokens >= config.max_seq_len
        assert config.warmup_steps > 0 and config.dtype == "bfloat16"
        assert config.model == preset.name
    # With no preset, the defaults still train the embedded tiny model.
    assert InstructionFinetuneConfig().model == "ft_tiny"
    assert "llama3_2_1b" in format_preset_list("instruction_finetune")


def test_layers_and_origins(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("max_num_steps: 7\nlearning_rate: 1.0e-5\n")
    config, origins = build_recipe_config(
        InstructionFinetuneConfig,
        args("OUT", "--preset", "llama3_2_1b", "--config-file", str(file), "--config", "learning_rate=3e-6"),
        recipe="instruction_finetune",
    )
    assert (config.max_seq_len, config.max_num_steps, config.learning_rate) == (8192, 7, 3e-6)
    assert origins == {**{k: "preset llama3_2_1b" for k in get_preset("instruction_finetune", "llama3_2_1b").values()},
                       "max_num_steps": str(file), "learning_rate": "command line"}
    text = annotated_dump(config, origins, explain=True)
    assert yaml.safe_load(text)["learning_rate"] == 3e-6  # still a config file
    assert "max_seq_len: 8192  # preset llama3_2_1b" in text
    assert "seed: 2  # default" in text
    assert "# Tokens per micro-batch per rank" in text


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'llama3_2_1' .*did you mean 'llama3_2_1b'"):
        get_preset("instruction_finetune", "llama3_2_1")


def test_help_lists_every_key_with_default_and_description():
    text = format_keys_help(InstructionFinetuneConfig)
    for doc in field_docs(InstructionFinetuneConfig):
        assert f"  {doc.key} = " in text
    assert "max_num_tokens = 2048" in text and "Tokens per micro-batch per rank" in text
