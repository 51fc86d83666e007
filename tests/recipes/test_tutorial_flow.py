"""fairseq2's end-to-end fine-tuning tutorial, run with `ft` in place of `fairseq2`
on a tiny model (docs/tutorial.md is the same flow, written up).

As in the tutorial: a two-document `@user` card file (the model card points at a
Meta `consolidated.00.pth`, the `llama3@user` family card at the tokenizer), the
one-liner with the tutorial's keys, stage 2 from a `--config-file` YAML that
resumes stage 1's `last_checkpoint` through `resume_checkpoint_dir` pointing at
`OUT/checkpoints` (ft writes into `OUT/ft_<hash>/checkpoints`), a run from
`checkpoint_step_N`, `lm generate` with the tutorial's keys, `llama write_hf_config
--model llama3`, and transformers loading the result with ft's logits and the
tokenizer's EOS. The one deviation: the card also sets `model_config`, so that
`llama3_2_1b` is a few-hundred-kilobyte model.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ft.cli import main
from ft.models import build_model, load_model, resolve_model
from ft.models.llama.model import LLAMA_ARCHS
from ft.tokenizers import load_tokenizer

from tests.tokenizers.tokenizer_helpers import CORPUS, train_byte_bpe_ranks, write_tiktoken_file

transformers = pytest.importorskip("transformers")

TINY = {"vocab_size": 1024, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128,
        "max_seq_len": 256}
META_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight", "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
TRAIN = [{"src": f"What is {a} + {b}?\n", "tgt": f"{a} + {b} = {a + b}\n#### {a + b}"} for a in range(9) for b in range(4)]


def write_meta_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """`model` as Meta's consolidated.00.pth: Meta's names, q/k in Meta's interleaved RoPE layout."""
    config, state = model.config, {}
    for name, tensor in model.state_dict().items():
        if name in META_NAMES:
            state[META_NAMES[name]] = tensor.clone()
            continue
        parts = name.removeprefix("model.").split(".")  # layers.N.<module>.<sub>.weight
        key = ".".join(parts[2:-1])
        if key in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = config.n_heads if key == "self_attn.q_proj" else config.n_kv_heads
            rows, cols = tensor.shape
            tensor = tensor.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)
        state[f"layers.{parts[1]}.{META_NAMES[key]}.weight"] = tensor.clone()
    state.pop("output.weight", None)  # tied, as Llama 3.2 1B
    torch.save(state, path)


@pytest.fixture
def tutorial(tmp_path, monkeypatch):
    """The tutorial's files: /models/Llama-3.2-1B/original/{consolidated.00.pth,tokenizer.model},
    the card file, and the GSM8K sft/test data."""
    original = tmp_path / "models" / "Llama-3.2-1B" / "original"
    original.mkdir(parents=True)
    write_tiktoken_file(train_byte_bpe_ranks(CORPUS, num_merges=300), original / "tokenizer.model")
    cards = tmp_path / "cards"
    cards.mkdir()
    monkeypatch.setenv("FT_USER_ASSET_DIR", str(cards))
    (cards / "my_llama3_2_1b.yaml").write_text(
        f'name: llama3_2_1b@user\ncheckpoint: "{original / "consolidated.00.pth"}"\nmodel_config: {json.dumps(TINY)}\n'
        f'\n---\n\nname: llama3@user\ntokenizer: "{original / "tokenizer.model"}"\n'
    )
    source = build_model(dataclasses.replace(LLAMA_ARCHS["llama3_2_1b"], **TINY), device="cpu", seed=0)
    write_meta_checkpoint(source, original / "consolidated.00.pth")
    assert resolve_model("llama3_2_1b").config == source.config  # the card's sizes
    data = tmp_path / "gsm8k"
    (data / "sft").mkdir(parents=True)
    (data / "test").mkdir()
    (data / "sft" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    (data / "test" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN[:4]))
    return tmp_path, source


def test_fairseq2_tutorial_flow(tutorial, monkeypatch):
    root, source = tutorial
    # The card resolves to the Meta checkpoint, loaded with Meta's RoPE layout undone.
    loaded = load_model("llama3_2_1b", dtype=torch.float32)
    tokens_BT = torch.randint(0, 800, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens_BT), source(tokens_BT))

    # Stage 1: the tutorial's one-liner (dtype float32 and a few steps: a CPU).
    out1 = root / "run1_output"
    assert main(["lm", "instruction_finetune", str(out1), "--config", f"dataset={root / 'gsm8k' / 'sft'}",
                 "model=llama3_2_1b", "max_num_tokens=512", "max_seq_len=64", "dtype=float32", "max_num_steps=4",
                 "max_num_data_epochs=20", "checkpoint_every_n_steps=2", "keep_last_n_checkpoints=2"]) == 0
    [run1] = out1.glob("ft_*")
    assert sorted(p.name for p in (run1 / "checkpoints").iterdir()) == ["step_2", "step_4"]

    # Stage 2 from the tutorial's YAML, resuming stage 1's last checkpoint; the YAML names
    # run1_output/checkpoints, which ft finds inside run1_output/ft_<hash>/.
    stage2 = root / "stage2.yaml"
    stage2.write_text(
        f"dataset: {root / 'gsm8k' / 'sft'}\nmodel: last_checkpoint\nresume_checkpoint_dir: {out1 / 'checkpoints'}\n"
        "max_num_tokens: 512\nmax_seq_len: 64\nmax_num_steps: 2\nmax_num_data_epochs: 20\ndtype: float32\n"
        "checkpoint_every_n_steps: 2\nkeep_last_n_checkpoints: 1\nkeep_last_n_models: 1\n"
        "publish_metrics_every_n_steps: 1\nlearning_rate: 1.0e-4\n"
    )
    out2 = root / "run2_output"
    assert main(["lm", "instruction_finetune", str(out2), "--no-sweep-dir", "--config-file", str(stage2)]) == 0
    log = (out2 / "logs" / "rank_0.log").read_text()
    assert "step_4" in log  # stage 2 started from stage 1's last checkpoint
    # And from a named step of stage 1.
    out3 = root / "run3_output"
    assert main(["lm", "instruction_finetune", str(out3), "--no-sweep-dir", "--config-file", str(stage2),
                 "--config", "model=checkpoint_step_2", f"resume_checkpoint_dir={run1 / 'checkpoints'}"]) == 0
    assert "step_2" in (out3 / "logs" / "rank_0.log").read_text()

    # Generate with the tutorial's keys (through `python -m ft`, as a user runs it).
    ckpt_dir = out2 / "checkpoints"
    save_dir = ckpt_dir / "generation"
    generated = subprocess.run(
        [sys.executable, "-m", "ft", "lm", "generate", str(save_dir), "--no-sweep-dir", "--config",
         f"checkpoint_dir={ckpt_dir}", "model=checkpoint_step_2", "generator_config.temperature=0.1",
         f"dataset={root / 'gsm8k' / 'test' / 'test.jsonl'}", "generator_config.max_gen_len=8"],
        capture_output=True, text=True, timeout=120,
    )
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert len((save_dir / "output" / "rank_0.jsonl").read_text().splitlines()) == 4

    # Convert for vLLM / transformers: write_hf_config with the family name.
    step = ckpt_dir / "step_2"
    (step / "config.json").unlink()
    (step / "generation_config.json").unlink()
    assert main(["llama", "write_hf_config", "--model", "llama3", str(step)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(step, torch_dtype=torch.float32)
    ours = load_model(step, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens_BT).logits, ours(tokens_BT), atol=2e-3, rtol=2e-3)
    tokenizer = load_tokenizer(str(step))
    eos = transformers.GenerationConfig.from_pretrained(step).eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    assert tokenizer.eos_id in eos and all(i < tokenizer.vocab_size for i in eos)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(step)
    assert hf_tokenizer.eos_token_id in eos
