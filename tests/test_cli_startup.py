"""`ft --help` and every verb's `--help` answer without importing torch (which takes
seconds), and still list what they listed: a recipe's config keys with their defaults
and descriptions, a family's archs and dtypes."""

import json
import subprocess
import sys

from ft.recipes.config_help import field_docs, format_keys_help
from ft.recipes.generate_config import GenerateConfig
from ft.recipes.instruction_finetune_config import InstructionFinetuneConfig
from ft.recipes.preference_finetune_config import PreferenceFinetuneConfig

# In a fresh interpreter: the help of the top level, of each group and of each verb, in
# one process (so the imports of all of them add up), then which heavy modules loaded.
PRINT_EVERY_HELP = r"""
import contextlib, io, json, sys
from ft.cli import main, registered_commands

argvs = [[]] + [[group] for group in registered_commands()]
argvs += [[group, verb] for group, verbs in registered_commands().items() for verb in verbs]
helps = {}
for argv in argvs:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main([*argv, "--help"])
        except SystemExit as exit:
            code = exit.code
    assert code in (0, None), (argv, code)
    helps[" ".join(argv)] = out.getvalue()
print(json.dumps({"helps": helps, "loaded": sorted(m for m in ("torch", "numpy") if m in sys.modules)}))
"""

RECIPE_CONFIGS = {
    "lm instruction_finetune": InstructionFinetuneConfig,
    "lm generate": GenerateConfig,
    "lm preference_finetune": PreferenceFinetuneConfig,
}


def _every_help() -> dict:
    result = subprocess.run([sys.executable, "-c", PRINT_EVERY_HELP], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_every_help_imports_no_torch_and_lists_what_it_did():
    report = _every_help()
    assert report["loaded"] == []
    helps = report["helps"]
    assert helps[""].startswith("usage: ft [-h] [--debug] GROUP ...")
    for group in ("lm", "llama", "qwen2", "qwen3", "mistral", "assets"):
        assert f"\n    {group} " in helps[""] and "COMMAND" in helps[group]
    for verb, config_class in RECIPE_CONFIGS.items():
        text = helps[verb]
        assert format_keys_help(config_class) in text
        docs = field_docs(config_class)
        assert len(docs) >= 10
        for doc in docs:
            assert f"\n  {doc.key} = {doc.default}" in text, (verb, doc.key)
    finetune = helps["lm instruction_finetune"]
    for line in ("lora.rank = 16", "lora.embeddings_on_host = false", "learning_rate = 0.003", "dtype = auto", "metric_recorders = [jsonl]",
                 "Tokens per micro-batch per rank (rows x max_seq_len)"):
        assert line in finetune
    assert "criterion.dpo.beta = 0.1" in helps["lm preference_finetune"]
    assert "generator_config.temperature = 0.6" in helps["lm generate"]
    llama = " ".join(helps["llama write_hf_config"].split())  # argparse wraps at the terminal width
    assert "a llama arch (e.g. ft_tiny)" in llama and "--dtype {bfloat16,float16,float32}" in llama
    assert "--type {model,tokenizer,dataset}" in helps["assets list"]
