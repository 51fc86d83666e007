"""The CLI surface: the verb list is frozen, help works, errors exit cleanly."""

import subprocess
import sys

import pytest

from ft.cli import main, registered_commands

# Adding a verb is a product decision: update this list on purpose.
FROZEN_VERBS = {
    "lm": ["generate", "instruction_finetune", "merge_lora", "preference_finetune"],
    "llama": ["write_hf_config"],
    "qwen2": ["write_hf_config"],
    "qwen3": ["write_hf_config"],
    "mistral": ["write_hf_config"],
    "assets": ["list", "show"],
}

# The recipe flags users type; renaming one breaks their scripts.
FROZEN_RECIPE_FLAGS = {"--config", "--config-file", "--dump-config", "--no-sweep-dir", "--debug", "--preset",
                       "--list-presets", "--explain", "--dry-run"}
# A merge has no presets, dry run or sweep directory: the recipe flags that mean something for it.
FROZEN_MERGE_FLAGS = {"--config", "--config-file", "--dump-config", "--debug", "--explain"}


def test_verb_list_is_frozen():
    assert registered_commands() == FROZEN_VERBS


def test_recipe_flags_are_frozen():
    from ft.cli import build_parser

    parser = build_parser()
    for group in ("lm",):
        group_parser = parser._subparsers._group_actions[0].choices[group]
        for name, command_parser in group_parser._subparsers._group_actions[0].choices.items():
            flags = {opt for action in command_parser._actions for opt in action.option_strings} - {"-h", "--help"}
            assert flags == (FROZEN_MERGE_FLAGS if name == "merge_lora" else FROZEN_RECIPE_FLAGS), name


def run_ft(*args, env=None, module="ft"):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env)


def test_help_lists_groups_and_commands():
    result = run_ft("--help")
    assert result.returncode == 0
    for group in FROZEN_VERBS:
        assert group in result.stdout
    result = run_ft("lm", "--help")
    assert "instruction_finetune" in result.stdout and "generate" in result.stdout


def test_python_m_ft_and_python_m_ft_cli_are_the_ft_command():
    for module in ("ft", "ft.cli"):
        result = run_ft("--help", module=module)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: ft [-h] [--debug] GROUP ...")
        assert "Fine-tune large language models." in result.stdout
        assert "language model recipes (fine-tuning, generation)" in result.stdout
        assert "list and inspect asset cards" in result.stdout


def test_command_module_imports_without_the_verbs():
    # `ft.cli` and `ft.cli.command` must not import the modules that define verbs
    # (they import `Command` from here): no cycle, whichever is imported first.
    code = (
        "import sys; import ft.cli; from ft.cli import Command; "
        "assert 'ft.recipes.instruction_finetune' not in sys.modules and 'ft.assets.cli' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for module in ("ft.assets.cli", "ft.recipes.instruction_finetune", "ft.recipes.generate"):
        result = subprocess.run([sys.executable, "-c", f"import {module}; import ft.cli; ft.cli.build_parser()"],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("dataset_format=chatt",
         "config key 'dataset_format': unknown dataset format 'chatt' (did you mean 'chat'?); "
         "registered: alpaca, chat, dolly, gsm8k, src_tgt; also: auto (detect per row)"),
        ("lr_schedule=cosin",
         "config key 'lr_schedule': unknown lr schedule 'cosin' (did you mean 'cosine'?); registered: constant, cosine, linear"),
        ("metric_recorders=[jsonl, tensorbord]",
         "config key 'metric_recorders': unknown metric recorder 'tensorbord' (did you mean 'tensorboard'?); "
         "registered: jsonl, tensorboard, wandb"),
    ],
)
def test_unknown_registered_name_in_config_is_a_clean_error(tmp_path, override, message):
    result = run_ft("lm", "instruction_finetune", str(tmp_path / "x"), "--config", override)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_unknown_config_key_exits_2_naming_the_key(tmp_path):
    result = run_ft("lm", "instruction_finetune", str(tmp_path / "x"), "--config", "no_such_key=1")
    assert result.returncode == 2
    assert "unknown config key 'no_such_key'" in result.stderr and "--config" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = run_ft("lm", "instruction_finetune", str(tmp_path / "x"), "--debug", "--config", "no_such_key=1")
    assert result.returncode != 0 and "Traceback" in result.stderr
    assert "ConfigError" in result.stderr and "unknown config key 'no_such_key'" in result.stderr
    assert not (tmp_path / "x").exists()


def test_dump_config_feeds_back(tmp_path):
    result = run_ft("lm", "instruction_finetune", str(tmp_path / "x"), "--dump-config", "--config", "max_num_tokens=4096", "dtype=bfloat16")
    assert result.returncode == 0
    config_file = tmp_path / "c.yaml"
    config_file.write_text(result.stdout)
    again = run_ft("lm", "instruction_finetune", str(tmp_path / "x"), "--dump-config", "--config-file", str(config_file))
    assert again.returncode == 0, again.stderr
    import yaml

    assert yaml.safe_load(again.stdout) == yaml.safe_load(result.stdout)
    assert "max_num_tokens: 4096  # command line" in result.stdout
    assert f"max_num_tokens: 4096  # {config_file}" in again.stdout  # each value says where it came from
    assert "seed: 2  # default" in result.stdout


def test_sweep_dir_depends_on_the_whole_config(tmp_path):
    from ft.config import build_config
    from ft.recipes.cli_support import prepare_output_dir
    from ft.recipes.instruction_finetune_config import InstructionFinetuneConfig

    a = prepare_output_dir(tmp_path, InstructionFinetuneConfig(), sweep=True, sweep_prefix="ft")
    b = prepare_output_dir(tmp_path, build_config(InstructionFinetuneConfig, overrides=["seed=7"]), sweep=True, sweep_prefix="ft")
    c = prepare_output_dir(tmp_path / "plain", InstructionFinetuneConfig(), sweep=False, sweep_prefix="ft")
    assert a != b and a.parent == b.parent == tmp_path
    assert c == tmp_path / "plain"
    assert (a / "config.yaml").is_file() and (c / "config.yaml").is_file()


def test_assets_list_and_show():
    listed = run_ft("assets", "list", "--type", "model")
    assert listed.returncode == 0
    for name in ("llama3_2_1b", "llama3_1_8b", "llama2_7b", "ft_tiny"):
        assert name in listed.stdout
    shown = run_ft("assets", "show", "llama3_2_1b")
    assert shown.returncode == 0
    assert "model_arch: llama3_2_1b" in shown.stdout and "llama.yaml" in shown.stdout


def test_unknown_card_is_a_clean_error():
    result = run_ft("assets", "show", "no_such_card")
    assert result.returncode == 1
    assert "no asset card named 'no_such_card'" in result.stderr and "Traceback" not in result.stderr
    assert "ft assets list" in result.stderr  # says where the known names are


@pytest.mark.parametrize("argv", [[], ["lm"]])
def test_bare_groups_print_help(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ft" + (" lm" if argv else ""))
    names = ["instruction_finetune", "generate"] if argv else list(FROZEN_VERBS)
    assert all(name in out for name in names), out
