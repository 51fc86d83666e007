"""`ft lm instruction_finetune` and `ft lm generate` on a tiny Qwen3 (random weights,
a byte-level BPE tokenizer trained in the test, cards in a test user dir), on CPU:
FSDP on 2 gloo processes trains like one process with gradient_accumulation=2, a
run saved on FSDP resumes on one process like the uninterrupted run, the export is a Qwen3ForCausalLM
whose generation_config stops at <|im_end|>, and generation stops at <|im_end|>."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ft.cli import main
from ft.models import build_model
from ft.models.hf_export import save_hf_model
from ft.models.qwen3.model import QWEN3_ARCHS

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tokenizers"))
from qwen_tokenizer_helpers import train_qwen_tokenizer  # noqa: E402

SETTINGS = [
    "model=tiny_qwen3", "max_seq_len=64", "max_num_tokens=128", "dtype=float32",
    "publish_metrics_every_n_steps=1", "warmup_steps=1", "save_model_dtype=float32", "keep_last_n_checkpoints=2",
]
ROWS = [
    {"messages": [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": f"{a + b}"}]}
    for a in range(6) for b in range(4)
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qwen_assets")
    tokenizer_dir = train_qwen_tokenizer(root / "tokenizer", qwen3=True)
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    # Weights from a checkpoint, so that every layout starts from the same model.
    config = dataclasses.replace(
        QWEN3_ARCHS["qwen3_debug_tied"], vocab_size=448, bos_id=None, pad_id=ids["<|endoftext|>"],
        eos_id=[ids["<|endoftext|>"], ids["<|im_end|>"]],
    )
    save_hf_model(build_model(config, device="cpu", seed=0), root / "model", dtype=torch.float32)
    cards = root / "cards"
    cards.mkdir()
    (cards / "tiny.yaml").write_text(
        f"name: tiny_qwen3\nmodel_family: qwen3\ncheckpoint: {root / 'model'}\n"
        f"tokenizer: {tokenizer_dir / 'tokenizer.json'}\ntokenizer_family: qwen\nuse_eot: true\n"
    )
    return cards


def run(out: Path, assets: Path, *overrides: str, nproc: int = 1) -> None:
    command = ["-m", "ft.cli", "lm", "instruction_finetune", str(out), "--no-sweep-dir", "--config", *SETTINGS,
               f"dataset={assets.parent / 'data'}", *overrides]
    if nproc > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *command]
    env = {**os.environ, "FT_USER_ASSET_DIR": str(assets), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def losses(out: Path) -> list[float]:
    lines = (out / "metrics" / "train.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.mark.slow
def test_fsdp_equals_accumulation_resume_export_and_generate(tmp_path, assets, monkeypatch):
    single, fsdp, resumed = tmp_path / "single", tmp_path / "fsdp", tmp_path / "resumed"
    run(single, assets, "gradient_accumulation=2", "max_num_steps=4", "checkpoint_every_n_steps=2")
    run(fsdp, assets, "max_num_steps=4", "checkpoint_every_n_steps=2", nproc=2)
    expected = losses(single)
    assert len(expected) == 4
    assert losses(fsdp) == pytest.approx(expected, rel=1e-5)

    # Saved at step 2 on FSDP, resumed on one process: the rest of the uninterrupted curve.
    shutil.copytree(fsdp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_4")
    run(resumed, assets, "gradient_accumulation=2", "max_num_steps=4", "checkpoint_every_n_steps=2")
    assert "resuming from" in (resumed / "logs" / "rank_0.log").read_text()
    assert losses(resumed) == pytest.approx(expected, rel=1e-5)

    step_dir = single / "checkpoints" / "step_4"
    hf = transformers.AutoModelForCausalLM.from_pretrained(step_dir)
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(step_dir)
    im_end = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = json.loads((step_dir / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert im_end == eos or im_end in eos


@pytest.mark.slow
def test_generation_stops_at_im_end(tmp_path, assets, monkeypatch):
    monkeypatch.setenv("FT_USER_ASSET_DIR", str(assets))
    out = tmp_path / "train"
    # One answer to learn, so that a few steps teach the model to end its turn.
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n")
    assert main(["lm", "instruction_finetune", str(out), "--no-sweep-dir", "--config", *SETTINGS,
                 f"dataset={data}", "max_num_steps=30", "learning_rate=1e-2", "checkpoint_every_n_steps=30"]) == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": ROWS[0]["messages"][:1]}) + "\n")
    assert main(["lm", "generate", str(tmp_path / "gen"), "--no-sweep-dir", "--config",
                 f"model={out / 'checkpoints' / 'step_30'}", f"dataset={prompts}",
                 "generator_config.max_gen_len=20", "generator_config.greedy=true"]) == 0
    record = json.loads((tmp_path / "gen" / "output" / "rank_0.jsonl").read_text().splitlines()[0])
    assert record["finish_reason"] == "stop"
    tokenizer_json = json.loads((out / "checkpoints" / "step_30" / "tokenizer.json").read_text())
    im_end = next(t["id"] for t in tokenizer_json["added_tokens"] if t["content"] == "<|im_end|>")
    assert record["token_ids"][-1] == im_end
    assert record["response"].strip().endswith("0")
