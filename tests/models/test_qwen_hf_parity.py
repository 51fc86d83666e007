"""Parity of the Qwen2 / Qwen2.5 and Qwen3 families with transformers'
Qwen2ForCausalLM / Qwen3ForCausalLM: HF save_pretrained -> ft logits, sharded
loading, ft export -> AutoModelForCausalLM (the family's own class), greedy
generation token for token, and the config.json of every arch."""

from __future__ import annotations

import json

import pytest
import torch

from ft.generation import GeneratorConfig, generate
from ft.models import load_model
from ft.models.family import family_for_hf_config
from ft.models.hf_export import save_hf_model, write_hf_config
from ft.models.qwen2.model import QWEN2_ARCHS
from ft.models.qwen3.model import QWEN3_ARCHS

transformers = pytest.importorskip("transformers")

VOCAB = 128
TOKENS_BT = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))

# name -> (HF config class name, HF model class name, kwargs): each feature in isolation and together.
CASES = {
    "qwen2_gqa_untied": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2_mha_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    # head_dim 24 != 64 / 4: the explicit head_dim is used, not hidden / heads.
    "qwen3_gqa_untied_head_dim": (
        "Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=False)
    ),
    "qwen3_gqa_tied": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
}


def make_hf_model(case: str, seed: int = 0):
    config_name, model_name, kwargs = CASES[case]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1_000_000.0, bos_token_id=1, eos_token_id=2,
        **kwargs,
    )
    model = getattr(transformers, model_name)(config).float().eval()
    with torch.no_grad():  # norms are ones and biases zero at init; randomize so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.5)
            elif "embed" in name or "lm_head" in name:
                p.normal_(0, 1.0)  # peaked distributions: greedy choices far from ties
    return model


def hf_logits(model, tokens_BT: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens_BT).logits


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    err = (actual.float() - expected.float()).abs().max() / expected.float().abs().max()
    assert err < rtol, f"relative error {err:.2e}"


def hf_from_pretrained(directory):
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    except TypeError:  # transformers 4.x
        return transformers.AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_hf_save_pretrained_loads_with_same_logits(tmp_path, case):
    hf = make_hf_model(case)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_model(tmp_path, dtype=torch.float32)
    assert type(model).__name__ == CASES[case][1].removesuffix("ForCausalLM")
    assert model.config.head_dim == CASES[case][2].get("head_dim", 64 // 4)
    with torch.no_grad():
        assert_close_rel(model(TOKENS_BT), hf_logits(hf, TOKENS_BT))


@pytest.mark.parametrize("case", ["qwen2_gqa_untied", "qwen3_gqa_untied_head_dim"])
def test_hf_sharded_dir_loads(tmp_path, case):
    hf = make_hf_model(case)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = load_model(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert_close_rel(model(TOKENS_BT), hf_logits(hf, TOKENS_BT))


@pytest.mark.parametrize("case", list(CASES))
def test_ft_export_loads_in_transformers_as_the_family_class(tmp_path, case):
    hf = make_hf_model(case)
    hf.save_pretrained(tmp_path / "src", safe_serialization=True)
    model = load_model(tmp_path / "src", dtype=torch.float32)
    save_hf_model(model, tmp_path / "out", dtype=torch.float32, max_shard_size_bytes=30_000)
    reloaded = hf_from_pretrained(tmp_path / "out")
    assert type(reloaded).__name__ == CASES[case][1]
    assert reloaded.config.tie_word_embeddings == CASES[case][2]["tie_word_embeddings"]
    with torch.no_grad():
        assert_close_rel(hf_logits(reloaded, TOKENS_BT), hf_logits(hf, TOKENS_BT))


class _IdTokenizer:
    """Prompts are lists of ids already; generate() needs only these."""

    def __init__(self, stop_ids):
        self.stop_ids = list(stop_ids)
        self.pad_id = 0
        self.eos_id = self.stop_ids[0] if self.stop_ids else VOCAB + 1

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("case", ["qwen2_gqa_untied", "qwen3_gqa_tied"])
def test_greedy_generation_equals_transformers(tmp_path, case):
    hf = make_hf_model(case)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_model(tmp_path, dtype=torch.float32)
    prompt = torch.randint(3, VOCAB, (11,), generator=torch.Generator().manual_seed(2)).tolist()
    outputs = generate(model, _IdTokenizer(stop_ids=()), [prompt], GeneratorConfig(greedy=True, max_gen_len=16))
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, min_new_tokens=16,
                               eos_token_id=None, pad_token_id=0, temperature=None, top_p=None, top_k=None)
    assert outputs[0].tokens == expected[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", sorted(QWEN2_ARCHS) + sorted(QWEN3_ARCHS))
def test_config_json_of_every_arch_loads_in_transformers(tmp_path, arch):
    config = QWEN2_ARCHS[arch] if arch in QWEN2_ARCHS else QWEN3_ARCHS[arch]
    write_hf_config(config, tmp_path)
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(hf).__name__ == ("Qwen2Config" if arch in QWEN2_ARCHS else "Qwen3Config")
    assert (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers) == (config.vocab_size, config.dim, config.n_layers)
    assert (hf.num_attention_heads, hf.num_key_value_heads) == (config.n_heads, config.n_kv_heads)
    assert hf.head_dim == config.head_dim and hf.intermediate_size == config.ffn_dim
    assert hf.tie_word_embeddings == config.tie_embeddings and hf.rms_norm_eps == config.norm_eps
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert family_for_hf_config(config_json).config_from_hf(config_json) == config  # reads back the same
