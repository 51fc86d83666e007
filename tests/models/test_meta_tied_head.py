"""The Meta loader accounts for `output.weight` under a tied config: equal to the
embedding it is dropped, different it is an error naming the tensor, the file and
the config field (never silently wrong logits)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ft.errors import CheckpointError
from ft.models.checkpoint import load_checkpoint
from ft.models.llama.model import LLAMA_ARCHS, Llama

META_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}


def model(tie: bool) -> Llama:
    config = dataclasses.replace(LLAMA_ARCHS["llama_debug"], tie_embeddings=tie)
    with torch.device("meta"):
        m = Llama(config)
    m.to_empty(device="cpu")
    m.reset_buffers()
    return m


def meta_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """An untied model's weights under Meta's names (q/k layouts do not matter here)."""
    torch.manual_seed(seed)
    source = model(tie=False)
    state = {}
    for name, tensor in source.state_dict().items():
        if name in META_NAMES:
            state[META_NAMES[name]] = torch.randn_like(tensor)
            continue
        layer = name.removeprefix("model.").split(".")  # layers.N.<module>.<sub>.weight
        key = ".".join(layer[2:-1])
        state[f"layers.{layer[1]}.{META_NAMES[key]}.weight"] = torch.randn_like(tensor)
    return state


def test_tied_config_refuses_a_different_output_weight(tmp_path):
    torch.save(meta_state(), tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(model(tie=True), tmp_path)
    text = str(caught.value)
    assert "'output.weight'" in text and "consolidated.00.pth" in text and "tie_embeddings" in text
    assert "\n" not in text


def test_tied_config_takes_an_output_weight_equal_to_the_embedding(tmp_path):
    state = meta_state()
    state["output.weight"] = state["tok_embeddings.weight"].clone()
    torch.save(state, tmp_path / "consolidated.00.pth")
    tied = model(tie=True)
    load_checkpoint(tied, tmp_path)
    torch.testing.assert_close(tied.lm_head.weight, state["tok_embeddings.weight"])


def test_untied_config_loads_the_separate_output_weight(tmp_path):
    state = meta_state()
    torch.save(state, tmp_path / "consolidated.00.pth")
    untied = model(tie=False)
    load_checkpoint(untied, tmp_path)
    torch.testing.assert_close(untied.lm_head.weight, state["output.weight"])
    torch.testing.assert_close(untied.model.embed_tokens.weight, state["tok_embeddings.weight"])
