"""`ft lm instruction_finetune` on a tiny Mistral (random initialisation from a card
with no checkpoint, a SentencePiece-style tokenizer trained in the test with the
[INST] control tokens, cards in a test user dir), on CPU: FSDP on 2 gloo processes
trains like one process with gradient_accumulation=2 (which needs the random start
to be the same on both layouts), and the export is a MistralForCausalLM whose
tokenizer renders the same chat ids as ft."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tokenizers"))
from mistral_tokenizer_helpers import train_mistral_tokenizer  # noqa: E402

SETTINGS = [
    "model=tiny_mistral", "max_seq_len=64", "max_num_tokens=128", "dtype=float32", "publish_metrics_every_n_steps=1",
    "warmup_steps=1", "save_model_dtype=float32", "max_num_steps=3", "checkpoint_every_n_steps=3",
]
ROWS = [
    {"messages": [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": f"{a + b}"}]}
    for a in range(6) for b in range(4)
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mistral_assets")
    tokenizer_dir = train_mistral_tokenizer(root / "tokenizer")
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cards = root / "cards"
    cards.mkdir()
    (cards / "tiny.yaml").write_text(
        "name: tiny_mistral\nmodel_family: mistral\nmodel_arch: mistral_debug\nmodel_config:\n  vocab_size: 704\n"
        f"tokenizer: {tokenizer_dir / 'tokenizer.json'}\ntokenizer_family: mistral\n"
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
    return [json.loads(line)["loss"] for line in (out / "metrics" / "train.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fsdp_equals_accumulation_and_export(tmp_path, assets, monkeypatch):
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    run(single, assets, "gradient_accumulation=2")
    run(fsdp, assets, nproc=2)
    expected = losses(single)
    assert len(expected) == 3
    assert losses(fsdp) == pytest.approx(expected, rel=1e-5)

    step_dir = fsdp / "checkpoints" / "step_3"
    assert type(transformers.AutoModelForCausalLM.from_pretrained(step_dir)).__name__ == "MistralForCausalLM"
    monkeypatch.setenv("FT_USER_ASSET_DIR", str(assets))
    from ft.tokenizers import load_tokenizer

    ours = load_tokenizer("tiny_mistral")
    dialog = ROWS[0]["messages"]
    hf_ids = transformers.AutoTokenizer.from_pretrained(step_dir).apply_chat_template(dialog, tokenize=True,
                                                                                      return_dict=False)
    assert hf_ids == ours.encode_chat(dialog)[0]
