"""`ft lm preference_finetune` end to end on the tiny default model (CPU, float32)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ft.cli import main
from ft.errors import EXIT_STOPPED
from ft.training.stop_signal import StopSignal
from tests.preference.conftest import WORDS, one_thread, write_copy_pairs  # noqa: F401 (fixture)
from tests.recipes.conftest import read_metrics

FAST = ["max_seq_len=16", "max_num_tokens=256", "publish_metrics_every_n_steps=1", "warmup_steps=2",
        "dtype=float32", "save_model_dtype=float32", "learning_rate=3e-3"]


def run(out: Path, dataset: Path, *overrides: str) -> int:
    return main(["lm", "preference_finetune", str(out), "--no-sweep-dir", "--config", f"dataset={dataset}", *FAST,
                 *overrides])


def weights(step_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(step_dir / "model.safetensors")


@pytest.fixture
def pairs(tmp_path, user_assets, one_thread):
    return write_copy_pairs(tmp_path / "data" / "train.jsonl", 48)


def greedy_right(model, tok) -> int:
    """Prompts of the copy task whose greedy answer starts with the prompt's word."""
    right = 0
    for word in WORDS:
        ids = tok.encode_prompt(f"Repeat: {word}\n")
        n = len(ids)
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        right += tok.decode(ids[n:]).strip().startswith(word)
    return right


def test_dpo_reward_accuracy_rises_and_generation_prefers_the_chosen_answers(tmp_path, pairs):
    """Chosen: the right answer of a copy task; rejected: a wrong word. Each criterion's
    loss is checked against its formula elsewhere; this is the learning check (DPO)."""
    from ft.models import load_model
    from ft.tokenizers import load_tokenizer

    out = tmp_path / "dpo"
    assert run(out, pairs, "max_num_steps=20", "max_num_tokens=512", "learning_rate=1e-2", "criterion.dpo.beta=1.0",
               "checkpoint_every_n_steps=100") == 0
    metrics = read_metrics(out)
    for key in ("loss", "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy", "chosen_logp",
                "rejected_logp", "chosen_nll", "rejected_nll", "tokens_per_s", "pairs"):
        assert key in metrics[-1]
    assert (out / "reference" / "logprobs.safetensors").is_file()
    last = sum(m["reward_accuracy"] for m in metrics[-3:]) / 3
    assert last > 0.9, [round(m["reward_accuracy"], 2) for m in metrics]
    assert metrics[-1]["loss"] < metrics[0]["loss"] and metrics[-1]["reward_margin"] > 0
    tok = load_tokenizer("ft_tiny")
    before = greedy_right(load_model("ft_tiny", device="cpu", dtype=torch.float32), tok)
    after = greedy_right(load_model(str(out / "checkpoints" / "step_20"), device="cpu", dtype=torch.float32), tok)
    assert after >= 6 and after > before, (before, after)


def test_resume_continues_exactly_including_the_reference_pass(tmp_path, pairs, monkeypatch):
    common = ["max_num_steps=4", "checkpoint_every_n_steps=2", "keep_last_n_checkpoints=2",
              "reference_save_every_n_rounds=1"]
    straight = tmp_path / "straight"
    assert run(straight, pairs, *common) == 0
    # Stop during the reference pass (after its first save), then re-run: the pass continues.
    out = tmp_path / "resumed"
    calls = {"n": 0}
    original = StopSignal.requested

    def stop_once(self, gangs):
        calls["n"] += 1
        return True if calls["n"] == 1 else original(self, gangs)

    monkeypatch.setattr(StopSignal, "requested", stop_once)
    assert run(out, pairs, *common) == EXIT_STOPPED
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    monkeypatch.setattr(StopSignal, "requested", original)
    assert run(out, pairs, *common[1:], "max_num_steps=2") == 0  # 2 steps, then resume to 4
    assert run(out, pairs, *common) == 0
    assert torch.equal(load_file(out / "reference" / "logprobs.safetensors")["logprobs"],
                       load_file(straight / "reference" / "logprobs.safetensors")["logprobs"])
    got, want = read_metrics(out), read_metrics(straight)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for g, w in zip(got, want):
        assert g["loss"] == w["loss"] and g["reward_accuracy"] == w["reward_accuracy"], g["step"]
    for name, tensor in weights(straight / "checkpoints" / "step_4").items():
        assert torch.equal(tensor, weights(out / "checkpoints" / "step_4")[name]), name


def test_validation_and_bad_settings(tmp_path, pairs, capsys):
    valid = write_copy_pairs(tmp_path / "data" / "valid.jsonl", 8, seed=1)
    out = tmp_path / "run"
    assert run(out, valid.parent, "max_num_steps=2", "validate_every_n_steps=2") == 0
    (record,) = read_metrics(out, "valid")
    assert record["pairs"] == 8 and "reward_accuracy" in record
    assert run(tmp_path / "x", pairs, "max_num_tokens=24") != 0
    assert run(tmp_path / "y", pairs, "criterion.name=kto") != 0
    assert main(["lm", "preference_finetune", str(tmp_path / "z"), "--config", "max_num_steps=1"]) != 0
    console = capsys.readouterr()
    text = console.out + console.err
    assert "2 x max_seq_len" in text and "unknown preference criterion 'kto'" in text
    assert "config key 'dataset' is required" in text


def test_model_only_checkpoints_written_in_the_background(tmp_path, pairs):
    out = tmp_path / "run"
    assert run(out, pairs, "max_num_steps=2", "checkpoint_every_n_steps=1", "save_model_only=true",
               "keep_last_n_checkpoints=null") == 0
    for step in (1, 2):
        step_dir = out / "checkpoints" / f"step_{step}"
        assert (step_dir / "model.safetensors").is_file() and not (step_dir / "trainer").exists()
    log = (out / "logs" / "rank_0.log").read_text()
    assert "in the background (training paused" in log


def test_partial_activation_checkpointing_trains_as_without(tmp_path, pairs, capsys):
    """activation_checkpointing_blocks reaches the preference recipe's model: the first block
    recomputed, the others not, and the same weights as no checkpointing (CPU float32: bitwise)."""
    plain, partial = tmp_path / "plain", tmp_path / "partial"
    assert run(plain, pairs, "max_num_steps=2") == 0
    assert run(partial, pairs, "max_num_steps=2", "activation_checkpointing=full", "activation_checkpointing_blocks=1") == 0
    expected = weights(plain / "checkpoints" / "step_2")
    got = weights(partial / "checkpoints" / "step_2")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert run(tmp_path / "bad", pairs, "activation_checkpointing=full", "activation_checkpointing_blocks=99") != 0
    assert "config key 'activation_checkpointing_blocks' must be between 0 and the model's" in capsys.readouterr().err
