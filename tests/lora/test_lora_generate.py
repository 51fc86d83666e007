"""`ft lm generate` with a LoRA adapter on its base (CPU, float32): `lora_dir=STEP`,
`checkpoint_dir=OUT/checkpoints model=last_checkpoint` of a LoRA run, and `model=STEP`
all generate what the merged export generates; a LoRA run's step given to
`instruction_finetune` starts a LoRA run from its adapter, and asks for LoRA settings
(or the merged model) otherwise."""

from __future__ import annotations

import json

from ft.cli import main
from tests.recipes.conftest import run_finetune, user_assets  # noqa: F401  (a fixture)

from tests.lora.lora_runs import LORA, lora_run  # noqa: F401  (a fixture)
PROMPTS = [{"src": "Name three colours."}, {"src": "What is 2 + 3?"}]


def generate(out, prompts, *overrides) -> list[list[int]]:
    assert main(["lm", "generate", str(out), "--no-sweep-dir", "--config", f"dataset={prompts}", "dtype=float32",
                 "generator_config.max_gen_len=8", "generator_config.greedy=true", *overrides]) == 0
    lines = (out / "output" / "rank_0.jsonl").read_text().splitlines()
    return [json.loads(line)["token_ids"] for line in lines]


def test_generate_with_an_adapter_equals_the_merged_model(tmp_path, user_assets, lora_run):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    step = lora_run / "checkpoints" / "step_3"
    merged = generate(tmp_path / "merged", prompts, f"model={step / 'merged'}")
    base = generate(tmp_path / "base", prompts)  # ft_tiny, the adapter's base
    assert merged != base  # three steps moved the adapters enough to change the greedy answers
    assert generate(tmp_path / "lora_dir", prompts, f"lora_dir={step}") == merged
    assert generate(tmp_path / "last", prompts, f"checkpoint_dir={lora_run / 'checkpoints'}",
                    "model=last_checkpoint") == merged
    assert generate(tmp_path / "step_path", prompts, f"model={step}") == merged
    assert main(["lm", "generate", str(tmp_path / "both"), "--no-sweep-dir", "--config", f"dataset={prompts}",
                 f"lora_dir={step}", f"checkpoint_dir={lora_run / 'checkpoints'}"]) != 0


def test_finetune_from_a_lora_step(tmp_path, user_assets, lora_run, capsys):
    resume = [f"resume_checkpoint_dir={lora_run / 'checkpoints'}", "model=last_checkpoint", "max_num_steps=2"]
    assert run_finetune(tmp_path / "full", "dtype=float32", *resume) != 0
    error = capsys.readouterr().err
    assert "is a LoRA adapter" in error and "lora.enabled=true" in error and "merged" in error
    assert run_finetune(tmp_path / "rank8", *LORA, "lora.rank=8", *resume) != 0
    assert "lora.rank" in capsys.readouterr().err
    assert run_finetune(tmp_path / "more", *LORA, *resume) == 0
    assert "adapters start from" in (tmp_path / "more" / "logs" / "rank_0.log").read_text()
