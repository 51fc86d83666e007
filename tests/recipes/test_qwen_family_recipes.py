"""The recipes on the Qwen families beyond FSDP (which `test_qwen_recipes.py` covers),
on CPU with random tiny models from cards in a test user dir and a byte-level BPE
tokenizer trained in the test: `ft lm instruction_finetune` with DDP on 2 gloo
processes trains a Qwen2 (q/k/v biases, whose gradients DDP must reduce too) like
one process with gradient_accumulation=2, and `ft lm preference_finetune` (DPO)
runs on a Qwen3 from a chat-format preference file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ft.cli import main
from tests.preference.conftest import write_copy_pairs
from tests.recipes.conftest import read_metrics

pytest.importorskip("tokenizers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tokenizers"))
from qwen_tokenizer_helpers import train_qwen_tokenizer  # noqa: E402

COMMON = ["max_seq_len=64", "max_num_tokens=128", "dtype=float32", "publish_metrics_every_n_steps=1",
          "warmup_steps=1", "save_model_dtype=float32", "max_num_steps=3", "checkpoint_every_n_steps=3"]
ROWS = [
    {"messages": [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": f"{a + b}"}]}
    for a in range(6) for b in range(4)
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qwen_family_assets")
    tokenizer_dir = train_qwen_tokenizer(root / "tokenizer", qwen3=True)
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cards = root / "cards"
    cards.mkdir()
    for family, arch in (("qwen2", "qwen2_debug"), ("qwen3", "qwen3_debug_tied")):
        # No checkpoint: a seeded random start, the same on every layout.
        (cards / f"{family}.yaml").write_text(
            f"name: tiny_{family}\nmodel_family: {family}\nmodel_arch: {arch}\nmodel_config:\n  vocab_size: 448\n"
            f"  bos_id: null\n  pad_id: {ids['<|endoftext|>']}\n  eos_id: [{ids['<|endoftext|>']}, {ids['<|im_end|>']}]\n"
            f"tokenizer: {tokenizer_dir / 'tokenizer.json'}\ntokenizer_family: qwen\nuse_eot: true\n"
        )
    return cards


def losses(out: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(out)]


@pytest.mark.slow
def test_qwen2_ddp_equals_accumulation(tmp_path, assets, monkeypatch):
    args = ["lm", "instruction_finetune", "--no-sweep-dir", "--config", "model=tiny_qwen2", *COMMON,
            f"dataset={assets.parent / 'data'}"]
    monkeypatch.setenv("FT_USER_ASSET_DIR", str(assets))
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main([*args[:2], str(single), *args[2:], "gradient_accumulation=2"]) == 0

    env = {**os.environ, "FT_USER_ASSET_DIR": str(assets), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "ft.cli",
               *args[:2], str(ddp), *args[2:], "data_parallelism=ddp"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = losses(single)
    assert len(expected) == 3
    assert losses(ddp) == pytest.approx(expected, rel=1e-5)


def test_qwen3_preference_finetune_dpo(tmp_path, assets, monkeypatch):
    monkeypatch.setenv("FT_USER_ASSET_DIR", str(assets))
    pairs = write_copy_pairs(tmp_path / "pairs" / "train.jsonl", 12, chat=True)
    out = tmp_path / "dpo"
    assert main(["lm", "preference_finetune", str(out), "--no-sweep-dir", "--config", "model=tiny_qwen3",
                 f"dataset={pairs}", "criterion.name=dpo", *COMMON]) == 0
    metrics = read_metrics(out)
    assert len(metrics) == 3
    for key in ("loss", "chosen_reward", "rejected_reward", "reward_accuracy"):
        assert key in metrics[-1]
    assert all(m["loss"] == m["loss"] for m in metrics)  # finite, not NaN
    assert (out / "checkpoints" / "step_3" / "config.json").is_file()
