"""`ft lm generate`: generate responses for a dataset's prompts and score them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ft.errors import FtError
from ft.recipes.cli_support import recipe_command


@dataclass(kw_only=True)
class GeneratorConfig:
    max_gen_len: int = 256
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    greedy: bool = False
    beam_size: int = 1
    length_penalty: float = 1.0
    batch_size: int = 16
    seed: int = 2
    echo_prompt: bool = False


@dataclass(kw_only=True)
class GenerateConfig:
    model: str = "ft_tiny"
    checkpoint_dir: str | None = None
    tokenizer: str | None = None
    dataset: str = "ft_default_sft"
    split: str = "test"
    dtype: str = "auto"
    device: str = "auto"
    tensor_parallel_size: int = 1
    generator_config: GeneratorConfig = field(default_factory=GeneratorConfig)


def run_generate(config: GenerateConfig, output_dir: Path) -> int:
    raise FtError("generate is not implemented yet")


GENERATE_COMMAND = recipe_command(
    help="generate responses for a dataset's prompts and score them",
    config_class=GenerateConfig,
    run=run_generate,
    sweep_prefix="gen",
)
