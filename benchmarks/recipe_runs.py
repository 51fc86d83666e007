"""What the benchmarks that run the recipe through its CLI share: a temporary card
for random weights of an arch, the GSM8K byte-level BPE of train_throughput.py, and
the recipe keys for GSM8K rows."""

from __future__ import annotations

from pathlib import Path


def bench_model_and_tokenizer(tmp: Path, *, arch: str, gsm8k: Path, tiny: bool) -> tuple[Path, Path]:
    """(user card dir holding `bench_model`, tokenizer dir) under `tmp`."""
    from train_throughput import train_gsm8k_tokenizer

    cards = tmp / "cards"
    cards.mkdir()
    (cards / "bench.yaml").write_text(f"name: bench_model\nmodel_family: llama\nmodel_arch: {arch}\n")
    train_gsm8k_tokenizer(gsm8k, tmp / "tok", vocab_size=400 if tiny else 4500)
    return cards, tmp / "tok"


def gsm8k_overrides(tokenizer: Path, gsm8k: Path, *, seq_len: int, max_num_tokens: int, steps: int) -> list[str]:
    return ["model=bench_model", f"tokenizer={tokenizer}", f"dataset={gsm8k}", "dataset_format=gsm8k",
            f"max_seq_len={seq_len}", f"max_num_tokens={max_num_tokens}", f"max_num_steps={steps}"]
