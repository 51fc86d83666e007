"""The exported config.json / generation_config.json carry the run's tokenizer ids,
not the arch's (a Llama 3 arch trained with another vocabulary must stop at that
vocabulary's EOS)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ft.models import find_arch
from ft.models.build import create_model
from ft.models.hf_export import config_with_tokenizer_ids, save_hf_model


@pytest.fixture(scope="module")
def gpt_like_tokenizer(tmp_path_factory):
    """A non-Llama tokenizer.json: BOS/EOS/PAD/end-of-turn at cl100k-style ids."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(100256)}
    vocab.update({"<|endoftext|>": 100257, "<|startoftext|>": 100256, "<|im_end|>": 100258, "<|pad|>": 100259,
                  "[UNK]": 100260})
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    model.add_special_tokens(["<|endoftext|>", "<|startoftext|>", "<|im_end|>", "<|pad|>"])
    out = tmp_path_factory.mktemp("gpt_tok")
    model.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>"}))
    from ft.tokenizers import load_tokenizer

    return load_tokenizer(out / "tokenizer.json")


def test_ids_come_from_the_tokenizer(gpt_like_tokenizer):
    tok = gpt_like_tokenizer
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id, tok.use_eot) == (100256, 100257, 100258, 100259, True)
    config = config_with_tokenizer_ids(find_arch("llama3_2_1b")[1], tok)
    assert (config.bos_id, config.eos_id, config.pad_id) == (100256, [100258, 100257], 100259)


def test_export_writes_the_tokenizers_ids(gpt_like_tokenizer, tmp_path):
    tok = gpt_like_tokenizer
    arch = dataclasses.replace(find_arch("ft_tiny")[1], vocab_size=100352)
    model = create_model(arch, device=torch.device("cpu"), dtype=torch.float32, seed=0, initialize=True)
    save_hf_model(model, tmp_path, dtype=torch.float32, tokenizer=tok)
    config = json.loads((tmp_path / "config.json").read_text())
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    for data in (config, generation):
        assert data["bos_token_id"] == 100256
        assert data["eos_token_id"] == [100258, 100257]  # end of turn first, then end of text
        assert data["pad_token_id"] == 100259
    transformers = pytest.importorskip("transformers")
    loaded = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert loaded.eos_token_id == [100258, 100257]
