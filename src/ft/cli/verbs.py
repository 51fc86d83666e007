"""The CLI surface: every `ft GROUP VERB`, registered in `register_commands`.

One `register(...)` line per verb, so the whole surface is visible in one place.
The verb modules are imported inside `register_commands`, not at import time:
they import `ft.cli.command`, and `ft.cli` must stay importable on its own. They
import no torch (a verb imports its heavy modules when it runs), so `ft --help`
and every verb's `--help` answer at once.
"""

from __future__ import annotations

from ft.cli.command import Command, CommandGroup
from ft.registry import Registry


def register_commands(groups: Registry[CommandGroup]) -> None:
    from ft.assets.cli import LIST_COMMAND, SHOW_COMMAND
    from ft.models.cli import write_hf_config_command
    from ft.models.family_names import family_names
    from ft.recipes.commands import GENERATE_COMMAND, INSTRUCTION_FINETUNE_COMMAND, PREFERENCE_FINETUNE_COMMAND
    from ft.recipes.merge_lora import MERGE_LORA_COMMAND

    lm = groups.register("lm", _group("lm", "language model recipes (fine-tuning, generation)"))
    lm.commands.register("instruction_finetune", INSTRUCTION_FINETUNE_COMMAND)
    lm.commands.register("generate", GENERATE_COMMAND)
    lm.commands.register("preference_finetune", PREFERENCE_FINETUNE_COMMAND)
    lm.commands.register("merge_lora", MERGE_LORA_COMMAND)

    for family in family_names():  # every registered family gets the same verbs
        group = groups.register(family, _group(family, f"{family} model family utilities"))
        group.commands.register("write_hf_config", write_hf_config_command(family))

    assets = groups.register("assets", _group("assets", "list and inspect asset cards"))
    assets.commands.register("list", LIST_COMMAND)
    assets.commands.register("show", SHOW_COMMAND)


def _group(name: str, help: str) -> CommandGroup:
    return CommandGroup(help=help, commands=Registry(f"`ft {name}` command"))


def command_groups() -> Registry[CommandGroup]:
    """The registered groups, built on each call (cheap), so a family registered at
    run time gets its verbs too."""
    groups: Registry[CommandGroup] = Registry("command group")
    register_commands(groups)
    return groups


def registered_commands() -> dict[str, list[str]]:
    """The CLI surface as {group: [verb, ...]} (frozen by a test)."""
    return {name: group.commands.names() for name, group in command_groups().items()}


__all__ = ["Command", "CommandGroup", "command_groups", "register_commands", "registered_commands"]
