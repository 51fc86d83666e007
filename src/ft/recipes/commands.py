"""The `ft lm` verbs: each recipe's help line, config class and run function.

Only the config classes are imported here (for `--help`'s list of keys); the run
functions are "module:function" paths, imported when the verb runs, so building the
parser imports no training code and no torch.
"""

from __future__ import annotations

from ft.recipes.cli_support import recipe_command
from ft.recipes.generate_config import GenerateConfig
from ft.recipes.instruction_finetune_config import InstructionFinetuneConfig
from ft.recipes.preference_finetune_config import PreferenceFinetuneConfig

INSTRUCTION_FINETUNE_COMMAND = recipe_command(
    help="fine-tune a language model on instruction data",
    config_class=InstructionFinetuneConfig,
    run="ft.recipes.instruction_finetune:run_instruction_finetune",
    dry_run="ft.recipes.sft_plan:dry_run_instruction_finetune",
    sweep_prefix="ft",
)

GENERATE_COMMAND = recipe_command(
    help="generate responses for a dataset's prompts and score them",
    config_class=GenerateConfig,
    run="ft.recipes.generate:run_generate",
    sweep_prefix="gen",
)

PREFERENCE_FINETUNE_COMMAND = recipe_command(
    help="fine-tune a language model on preference pairs (DPO, SimPO, ORPO, CPO)",
    config_class=PreferenceFinetuneConfig,
    run="ft.recipes.preference_finetune:run_preference_finetune",
    sweep_prefix="ft",
)

__all__ = ["GENERATE_COMMAND", "INSTRUCTION_FINETUNE_COMMAND", "PREFERENCE_FINETUNE_COMMAND"]
