"""The memory savers in `ft lm instruction_finetune` on the embedded default (CPU):
each trains with a falling loss and resumes exactly; impossible combinations are one
line naming the keys; `--dry-run` prints the plan."""

from __future__ import annotations

import pytest

from ft.cli import main
from ft.errors import EXIT_STOPPED
from tests.recipes.conftest import read_metrics, run_finetune
from tests.recipes.test_instruction_finetune import assert_same_weights, stop_after

# Plain adafactor, in-backward AdamW and the plain step are covered against each other in
# tests/training/test_optimizers.py; here each saver runs once through the recipe.
SAVERS = {
    "adafactor_in_backward": ["optimizer=adafactor", "learning_rate=1e-2", "optimizer_in_backward=true",
                              "max_grad_norm=null"],
    "cpu_offload": ["optimizer_cpu_offload=true"],
    "activation_offloading": ["activation_offloading=true", "activation_checkpointing=selective"],
    "partial_checkpointing": ["activation_checkpointing=full", "activation_checkpointing_blocks=2"],
    "bf16_stochastic_rounding": ["dtype=bfloat16", "mixed_precision=false", "bf16_stochastic_rounding=true",
                                 "optimizer_in_backward=true", "max_grad_norm=null"],
}


@pytest.mark.parametrize("name", list(SAVERS))
def test_saver_trains_and_resumes_exactly(tmp_path, user_assets, monkeypatch, name):
    settings = ["max_num_steps=6", "checkpoint_every_n_steps=100", "save_model_dtype=float32", *SAVERS[name]]
    full = tmp_path / "full"
    assert run_finetune(full, *settings) == 0
    losses = [m["loss"] for m in read_metrics(full)]
    assert sum(losses[-2:]) / 2 < losses[0] - 0.3, losses
    assert read_metrics(full)[0]["predicted_peak_memory_gib"] > 0

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        stop_after(patch, 3)
        assert run_finetune(resumed, *settings) == EXIT_STOPPED
    assert run_finetune(resumed, *settings) == 0
    assert losses == [m["loss"] for m in read_metrics(resumed)]
    assert_same_weights(full / "checkpoints" / "step_6", resumed / "checkpoints" / "step_6")


BAD = [
    (["optimizer_in_backward=true"], "config keys 'optimizer_in_backward' and 'max_grad_norm'"),
    (["optimizer_in_backward=true", "max_grad_norm=null", "gradient_accumulation=2"],
     "config keys 'optimizer_in_backward' and 'gradient_accumulation' (2)"),
    (["optimizer_in_backward=true", "max_grad_norm=null", "nonfinite_policy=skip_step"],
     "config keys 'optimizer_in_backward' and 'nonfinite_policy'"),
    (["optimizer_cpu_offload=true", "optimizer=adamw4bit"], "config keys 'optimizer_cpu_offload' and 'optimizer'"),
    (["bf16_stochastic_rounding=true"], "config key 'bf16_stochastic_rounding' applies to bfloat16 parameters"),
    (["optimizer=adam"], "config key 'optimizer': unknown optimizer 'adam' (did you mean 'adamw'?)"),
    (["max_memory_gib=0"], "config key 'max_memory_gib' must be a finite number > 0"),
    (["activation_checkpointing_blocks=1"],
     "config key 'activation_checkpointing_blocks' (1) needs activation_checkpointing=elementwise, selective or full"),
    (["activation_checkpointing=selective", "activation_checkpointing_blocks=-1"],
     "config key 'activation_checkpointing_blocks' must be at least 0, or null for every block, got -1"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_impossible_combination_is_one_line(tmp_path, user_assets, capsys, overrides, message):
    assert run_finetune(tmp_path / "run", *overrides) == 2
    assert_one_error_line(capsys.readouterr().err, message)
    assert not (tmp_path / "run").exists()


def assert_one_error_line(err: str, message: str) -> None:
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: {message}"), line


# Refused once the model (its block count) and the layout are known.
BAD_LAYOUT = [
    (["activation_checkpointing=full", "activation_checkpointing_blocks=5"],
     "config key 'activation_checkpointing_blocks' must be between 0 and the model's 4 blocks"),
    (["activation_checkpointing=full", "activation_checkpointing_blocks=2", "pipeline_parallel_size=2",
      "gradient_accumulation=2"],
     "config key 'activation_checkpointing_blocks' (2) cannot be combined with pipeline_parallel_size=2"),
]


@pytest.mark.parametrize("overrides, message", BAD_LAYOUT, ids=[" ".join(o) for o, _ in BAD_LAYOUT])
def test_impossible_layout_is_one_line(tmp_path, user_assets, capsys, overrides, message):
    assert run_finetune(tmp_path / "run", *overrides) == 2
    assert_one_error_line(capsys.readouterr().err, message)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_dry_run_prints_the_plan_and_builds_nothing(tmp_path, user_assets, capsys):
    out = tmp_path / "run"
    assert main(["lm", "instruction_finetune", str(out), "--dry-run", "--config", "max_memory_gib=0.55"]) == 0
    text = capsys.readouterr().out
    for expected in ("parameters: 918,656 trainable of 918,656", "tokens per step: 2,048", "steps per epoch: ~",
                     "optimizer_states", "activations", "peak allocated", "fits: no", "cheapest change that fits: activation_checkpointing="):
        assert expected in text, (expected, text)
    assert not out.exists()


def test_dry_run_shows_partial_checkpointing_and_its_memory(tmp_path, user_assets, capsys):
    def dry_run(*settings: str) -> tuple[str, float]:
        # Enough tokens that activations show in the printed GiB.
        assert main(["lm", "instruction_finetune", str(tmp_path / "run"), "--dry-run", "--config",
                     "max_num_tokens=65536", *settings]) == 0
        text = capsys.readouterr().out
        (peak,) = [line for line in text.splitlines() if line.strip().startswith("peak allocated")]
        return text, float(peak.split()[2])

    text, partial = dry_run("activation_checkpointing=selective", "activation_checkpointing_blocks=1")
    assert "activation checkpointing: selective on the first 1 of 4 blocks" in text, text
    text, every = dry_run("activation_checkpointing=selective")
    assert "activation checkpointing: selective on all 4 blocks" in text, text
    _, none = dry_run("activation_checkpointing=none")
    assert every < partial < none


def test_dry_run_plans_an_8b_model_without_its_checkpoint(tmp_path, user_assets, capsys):
    args = ["lm", "instruction_finetune", str(tmp_path / "run"), "--dry-run", "--config", "model=llama3_1_8b",
            "tokenizer=ft_tiny", "dtype=bfloat16", "max_seq_len=2048", "max_num_tokens=4096", "max_memory_gib=24",
            "mixed_precision=false", "optimizer=adafactor", "optimizer_in_backward=true", "max_grad_norm=null",
            "activation_checkpointing=full", "loss_chunk_size=256"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "parameters: 8,030,261,248 trainable" in text and "fits: yes" in text, text
