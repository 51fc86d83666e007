"""`ft lm instruction_finetune` end to end on the embedded default (CPU, float32)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ft.training.export as export
from ft.errors import EXIT_STOPPED
from ft.training.stop_signal import StopSignal
from tests.recipes.conftest import read_metrics, run_finetune

GSM8K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def weights(step_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(step_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_run_writes_checkpoints_metrics_logs_and_config(tmp_path, user_assets):
    out = tmp_path / "run"
    assert run_finetune(out, "max_num_steps=4", "checkpoint_every_n_steps=2", "keep_last_n_checkpoints=1") == 0
    assert (out / "config.yaml").is_file() and (out / "logs" / "rank_0.log").is_file()
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step_2", "step_4"]
    # keep_last_n_checkpoints=1 pruned step_2's trainer state but kept its model.
    assert not (out / "checkpoints" / "step_2" / "trainer").exists()
    assert (out / "checkpoints" / "step_2" / "model.safetensors").is_file()
    final = out / "checkpoints" / "step_4"
    assert (final / "trainer" / ".metadata").is_file() and (final / "config.json").is_file()
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # Steps 1-2 are warm-up (compilation, allocation): their time is warmup_s, not throughput.
    assert "warmup_s" in metrics[0] and "tokens_per_s" not in metrics[0] and "warmup_s" not in metrics[2]
    for key in ("loss", "lr", "grad_norm", "target_tokens_per_s", "tokens_per_s", "examples", "epoch", "elapsed_s"):
        assert key in metrics[2]


def test_exported_step_loads_in_transformers(tmp_path, user_assets):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "run"
    assert run_finetune(out, "max_num_steps=2", "save_model_dtype=float32") == 0
    step_dir = out / "checkpoints" / "step_2"
    hf = transformers.AutoModelForCausalLM.from_pretrained(step_dir)
    from ft.models import load_model

    ours = load_model(step_dir, dtype=torch.float32)
    tokens = torch.randint(0, 1000, (2, 16))
    torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(step_dir)
    assert tokenizer("What is 3 + 4?")["input_ids"]


def stop_after(monkeypatch, n_steps: int) -> None:
    """Act as if SIGTERM arrived during step `n_steps`."""
    calls = {"n": 0}

    def requested(self, gangs):
        calls["n"] += 1
        return self.flag or calls["n"] == n_steps

    monkeypatch.setattr(StopSignal, "requested", requested)


def test_interrupted_run_resumes_exactly(tmp_path, user_assets, monkeypatch):
    settings = ["max_num_steps=6", "checkpoint_every_n_steps=100", "save_model_dtype=float32"]
    full = tmp_path / "full"
    assert run_finetune(full, *settings) == 0

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        stop_after(patch, 3)
        assert run_finetune(resumed, *settings) == EXIT_STOPPED
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_3"]
    assert run_finetune(resumed, *settings) == 0

    assert [m["loss"] for m in read_metrics(full)] == [m["loss"] for m in read_metrics(resumed)]
    assert_same_weights(full / "checkpoints" / "step_6", resumed / "checkpoints" / "step_6")


def test_crash_while_writing_a_checkpoint_keeps_earlier_ones(tmp_path, user_assets, monkeypatch):
    out = tmp_path / "run"
    settings = ["max_num_steps=6", "checkpoint_every_n_steps=2", "keep_last_n_checkpoints=2", "save_model_dtype=float32"]
    real_save = export.save_hf_state_dict
    calls = {"n": 0}

    def crashing_save(items, config, directory, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the step_4 save: write part of it, then die
            (Path(directory) / "model.safetensors").write_bytes(b"half a file")
            raise RuntimeError("simulated crash while writing")
        return real_save(items, config, directory, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(export, "save_hf_state_dict", crashing_save)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_finetune(out, *settings)
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2", "step_4.tmp"]
    from ft.models import load_model

    load_model(checkpoints / "step_2")  # the earlier checkpoint is whole

    assert run_finetune(out, *settings) == 0
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2", "step_4", "step_6"]
    assert not (checkpoints / "step_2" / "trainer").exists()  # pruned to the last 2 trainer states
    log_text = (out / "logs" / "rank_0.log").read_text()
    assert "removing incomplete checkpoint" in log_text and "resuming from" in log_text and "step_2" in log_text
    reference = tmp_path / "reference"
    assert run_finetune(reference, *settings) == 0
    assert_same_weights(reference / "checkpoints" / "step_6", checkpoints / "step_6")


def test_resume_checkpoint_dir_starts_from_previous_weights(tmp_path, user_assets):
    first = tmp_path / "first"
    assert run_finetune(first, "max_num_steps=30", "learning_rate=3e-3") == 0
    first_losses = [m["loss"] for m in read_metrics(first)]
    second = tmp_path / "second"
    assert run_finetune(
        second, f"resume_checkpoint_dir={first / 'checkpoints'}", "model=last_checkpoint", "learning_rate=1e-4",
        "max_num_steps=2",
    ) == 0
    second_losses = [m["loss"] for m in read_metrics(second)]
    # Fresh optimizer and data, but the weights carry the first run's progress.
    assert second_losses[0] < first_losses[0] - 1.0
    assert (second / "checkpoints" / "step_2").is_dir()


def test_gradient_accumulation_and_validation(tmp_path, user_assets):
    out = tmp_path / "run"
    assert run_finetune(out, "max_num_steps=2", "gradient_accumulation=2", "validate_every_n_steps=1") == 0
    valid = read_metrics(out, "valid")
    assert [m["step"] for m in valid] == [1, 2] and valid[0]["loss"] > 0


def test_max_num_data_epochs_ends_the_run(tmp_path, user_assets):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"src": f"say {i}", "tgt": f"{i}"}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    assert run_finetune(out, f"dataset={data}", "max_num_data_epochs=1", "max_num_steps=1000") == 0
    metrics = read_metrics(out)
    assert metrics[-1]["step"] < 1000
    assert (out / "checkpoints" / f"step_{metrics[-1]['step']}").is_dir()


@pytest.mark.skipif(not GSM8K.is_file(), reason="GSM8K data not present")
def test_short_run_on_gsm8k(tmp_path, user_assets):
    out = tmp_path / "gsm8k"
    assert run_finetune(out, f"dataset={GSM8K}", "max_seq_len=512", "max_num_tokens=1024", "max_num_steps=3") == 0
    metrics = read_metrics(out)
    assert len(metrics) == 3 and all(m["loss"] > 0 for m in metrics)


def test_readme_main_command_trains_the_default(tmp_path, user_assets):
    """The README's first command: no --config at all; the loss must clearly fall."""
    env = {**os.environ, "FT_USER_ASSET_DIR": str(user_assets)}
    result = subprocess.run(
        [sys.executable, "-m", "ft.cli", "lm", "instruction_finetune", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "out").iterdir()
    losses = [m["loss"] for m in read_metrics(run_dir)]
    assert losses[-1] < 0.5 * losses[0], losses

    # Then the tutorial's second step: generate on the held-out split and score it.
    generated = subprocess.run(
        [sys.executable, "-m", "ft.cli", "lm", "generate", str(tmp_path / "gen"), "--no-sweep-dir", "--config",
         f"checkpoint_dir={run_dir / 'checkpoints'}", "model=last_checkpoint", "generator_config.greedy=true"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert "accuracy" in generated.stdout + generated.stderr
    metrics = json.loads((tmp_path / "gen" / "metrics" / "generate.json").read_text())
    assert metrics["num_rows"] == 200
    # An untrained model scores ~0 on the arithmetic rows; the trained one clearly above.
    assert metrics["accuracy"] > 0.05, metrics


@pytest.mark.parametrize("precision", [["dtype=float16"], ["dtype=bfloat16", "mixed_precision=false"]])
def test_reduced_precision_runs(tmp_path, user_assets, precision):
    out = tmp_path / "run"
    assert run_finetune(out, "max_num_steps=3", *precision) == 0
    losses = [m["loss"] for m in read_metrics(out)]
    assert all(0 < loss < 20 for loss in losses) and losses[-1] < losses[0]
    from ft.training.extra_state import load_extra_state

    extra = load_extra_state(out / "checkpoints" / "step_3" / "trainer")
    # float16 trains through a gradient scaler whose state is checkpointed.
    assert bool(extra["scaler"]) == (precision == ["dtype=float16"])
