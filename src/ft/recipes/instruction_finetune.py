"""`ft lm instruction_finetune`: supervised fine-tuning of a causal LM."""

from __future__ import annotations

from pathlib import Path

from ft.errors import FtError
from ft.recipes.cli_support import recipe_command
from ft.recipes.instruction_finetune_config import InstructionFinetuneConfig


def run_instruction_finetune(config: InstructionFinetuneConfig, output_dir: Path) -> int:
    raise FtError("instruction_finetune is not implemented yet")


INSTRUCTION_FINETUNE_COMMAND = recipe_command(
    help="fine-tune a language model on instruction data",
    config_class=InstructionFinetuneConfig,
    run=run_instruction_finetune,
    sweep_prefix="ft",
)
