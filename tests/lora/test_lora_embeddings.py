"""`lora.train_embeddings`: the trained embedding and output projection are saved as PEFT's
`modules_to_save` and PEFT loads them (untied and tied Llamas, float32, CPU); the merged
export carries them too."""

from __future__ import annotations

import json

import pytest
import torch

from ft.lora import LoraConfig, apply_lora, init_lora_weights, lora_state_dict
from ft.lora.merge import merge_adapter
from ft.lora.peft_io import load_adapter, save_adapter
from ft.models import build_model
from ft.models.hf_export import save_hf_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOKENS = torch.tensor([[1, 5, 9, 200, 17, 3, 44, 8], [2, 7, 7, 100, 31, 250, 6, 12]])


@pytest.mark.parametrize("arch", ["llama_debug", "llama_debug_tied"])
def test_trained_embeddings_load_in_peft_and_merge(tmp_path, arch):
    base = build_model(arch, device="cpu", seed=0)
    save_hf_model(base, tmp_path / "base", dtype=torch.float32)
    config = LoraConfig(enabled=True, rank=4, alpha=8, target_modules=["q_proj", "down_proj"], train_embeddings=True)
    model = apply_lora(base, config, base_dtype=torch.float32)
    init_lora_weights(model, seed=0)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # as if trained: adapters and both embeddings moved
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        logits = model(TOKENS)
    state = lora_state_dict(model)
    tied = model.config.tie_embeddings
    assert {"model.embed_tokens.weight", *([] if tied else ["lm_head.weight"])} <= set(state)

    adapter_dir = save_adapter(tmp_path / "adapter", state, config, dtype=torch.float32,
                               base_model_name_or_path=str(tmp_path / "base"))
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == (["embed_tokens"] if tied else ["embed_tokens", "lm_head"])
    assert load_adapter(adapter_dir)[0].train_embeddings

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(hf_base, adapter_dir).eval()
    peft_embedding = loaded.get_input_embeddings().weight
    torch.testing.assert_close(peft_embedding, state["model.embed_tokens.weight"], rtol=0, atol=0)
    if not tied:  # PEFT replaces only the input embedding of a tied model; its head keeps the base's
        with torch.no_grad():
            torch.testing.assert_close(loaded(TOKENS).logits, logits, rtol=1e-4, atol=1e-4)

    merged = merge_adapter(tmp_path / "base", adapter_dir, tmp_path / "merged", dtype=torch.float32)
    merged_model = transformers.AutoModelForCausalLM.from_pretrained(merged, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged_model(TOKENS).logits, logits, rtol=1e-4, atol=1e-4)
