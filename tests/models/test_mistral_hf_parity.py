"""Parity of the Mistral family with transformers' MistralForCausalLM: HF
save_pretrained -> ft logits, ft export -> AutoModelForCausalLM (MistralForCausalLM),
a v0.1-style sliding window, and the config.json of every arch."""

from __future__ import annotations

import json

import pytest
import torch

from ft.models import load_model
from ft.models.family import family_for_hf_config
from ft.models.hf_export import save_hf_model, write_hf_config
from ft.models.mistral.model import MISTRAL_ARCHS

transformers = pytest.importorskip("transformers")

VOCAB = 128
TOKENS_BT = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))


def make_hf_model(*, head_dim: int | None = 24, sliding_window: int | None = None):
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_theta=1_000_000.0, sliding_window=sliding_window, bos_token_id=1, eos_token_id=2,
    )
    model = transformers.MistralForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def logits(model, tokens_BT):
    with torch.no_grad():
        out = model(tokens_BT)
    return getattr(out, "logits", out)


def assert_close_rel(actual, expected, rtol: float = 1e-4) -> None:
    err = (actual.float() - expected.float()).abs().max() / expected.float().abs().max()
    assert err < rtol, f"relative error {err:.2e}"


@pytest.mark.parametrize("head_dim", [24, None])
def test_hf_save_pretrained_loads_and_exports_with_same_logits(tmp_path, head_dim):
    hf = make_hf_model(head_dim=head_dim)
    hf.save_pretrained(tmp_path / "src", safe_serialization=True)
    model = load_model(tmp_path / "src", dtype=torch.float32)
    assert type(model).__name__ == "Mistral" and model.config.head_dim == (head_dim or 16)
    assert_close_rel(logits(model, TOKENS_BT), logits(hf, TOKENS_BT))

    save_hf_model(model, tmp_path / "out", dtype=torch.float32)
    try:
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    except TypeError:  # transformers 4.x
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32)
    assert type(reloaded).__name__ == "MistralForCausalLM"
    assert_close_rel(logits(reloaded.eval(), TOKENS_BT), logits(hf, TOKENS_BT))


def test_sliding_window_caps_the_context(tmp_path):
    """Mistral 7B v0.1 style: within the window, full attention is what the model computes."""
    hf = make_hf_model(sliding_window=64)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_model(tmp_path, dtype=torch.float32)
    assert model.config.max_seq_len == 64
    assert_close_rel(logits(model, TOKENS_BT), logits(hf, TOKENS_BT))


@pytest.mark.parametrize("arch", sorted(MISTRAL_ARCHS))
def test_config_json_of_every_arch_loads_in_transformers(tmp_path, arch):
    config = MISTRAL_ARCHS[arch]
    write_hf_config(config, tmp_path)
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(hf, transformers.MistralConfig)
    assert (hf.vocab_size, hf.hidden_size, hf.head_dim, hf.num_key_value_heads) == (
        config.vocab_size, config.dim, config.head_dim, config.n_kv_heads
    )
    assert hf.sliding_window is None
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert family_for_hf_config(config_json).config_from_hf(config_json) == config
