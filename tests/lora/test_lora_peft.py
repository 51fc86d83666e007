"""LoRA against PEFT on tiny Llamas (float32, CPU): the same forward on the same
weights, PEFT loads ft's adapter export, transformers loads ft's merged export, and
a PEFT-written adapter reads back into ft."""

from __future__ import annotations

import json

import pytest
import torch

from ft.errors import CheckpointError, ConfigError
from ft.lora import LoraConfig, apply_lora, init_lora_weights, lora_state_dict
from ft.lora.merge import merge_adapter
from ft.lora.peft_io import load_adapter, save_adapter
from ft.models import build_model
from ft.models.hf_export import save_hf_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOKENS = torch.tensor([[1, 5, 9, 200, 17, 3, 44, 8], [2, 7, 7, 100, 31, 250, 6, 12]])


def _lora_model(arch: str, config: LoraConfig, *, seed: int = 0):
    model = build_model(arch, device="cpu", seed=seed)
    base_logits = model(TOKENS).detach()
    apply_lora(model, config, base_dtype=torch.float32)
    init_lora_weights(model, seed=seed)
    return model, base_logits


def _randomize_b(model, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


@pytest.fixture
def base_dir(tmp_path):
    model = build_model("llama_debug", device="cpu", seed=0)
    save_hf_model(model, tmp_path / "base", dtype=torch.float32)
    return tmp_path / "base"


def test_zero_b_equals_base_and_only_adapters_train():
    model, base_logits = _lora_model("llama_debug", LoraConfig(enabled=True, rank=4, alpha=8))
    torch.testing.assert_close(model(TOKENS), base_logits, rtol=0, atol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * model.config.n_layers


def test_unknown_target_module_lists_the_valid_names():
    with pytest.raises(ConfigError, match=r"'qproj'.*valid names: down_proj, gate_proj, k_proj, o_proj, q_proj"):
        _lora_model("llama_debug", LoraConfig(enabled=True, target_modules=["qproj"]))


def _peft_model(base_dir, config: LoraConfig):
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    peft_config = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                  target_modules=config.target_modules)
    return peft.get_peft_model(base, peft_config)


def test_forward_equals_peft_on_the_same_weights(base_dir):
    config = LoraConfig(enabled=True, rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model, _ = _lora_model("llama_debug", config)
    _randomize_b(model)
    reference = _peft_model(base_dir, config)
    ours = {n.replace(".default", ""): p for n, p in reference.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, tensor in lora_state_dict(model).items():
            ours["base_model.model." + name].copy_(tensor)
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), reference(TOKENS).logits, rtol=1e-5, atol=1e-5)


def test_peft_loads_the_adapter_export_and_transformers_the_merged_one(base_dir, tmp_path):
    config = LoraConfig(enabled=True, rank=4, alpha=16)
    model, _ = _lora_model("llama_debug", config)
    _randomize_b(model)
    with torch.no_grad():
        logits = model(TOKENS)
    adapter_dir = save_adapter(tmp_path / "adapter", lora_state_dict(model), config, dtype=torch.float32,
                               base_model_name_or_path=str(base_dir))
    keys = set(load_adapter(adapter_dir)[1])
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)  # only the adapted modules, no embeddings
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS).logits, logits, rtol=1e-4, atol=1e-4)

    merged_dir = merge_adapter(base_dir, adapter_dir, tmp_path / "merged", dtype=torch.float32)
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(TOKENS).logits, logits, rtol=1e-4, atol=1e-4)


def test_an_adapter_peft_wrote_loads_into_ft(base_dir, tmp_path):
    config = LoraConfig(enabled=True, rank=4, alpha=8, target_modules=["k_proj", "up_proj"])
    reference = _peft_model(base_dir, config)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    reference.save_pretrained(tmp_path / "peft_adapter")
    read_config, state = load_adapter(tmp_path / "peft_adapter")
    assert (read_config.rank, read_config.alpha, sorted(read_config.target_modules)) == (4, 8, ["k_proj", "up_proj"])
    model, _ = _lora_model("llama_debug", read_config)
    model.load_state_dict(state, strict=False)
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), reference(TOKENS).logits, rtol=1e-5, atol=1e-5)


def test_merge_without_a_base_checkpoint_is_a_clear_error(tmp_path):
    config = LoraConfig(enabled=True, rank=2, alpha=2)
    model, _ = _lora_model("llama_debug", config)
    adapter_dir = save_adapter(tmp_path / "adapter", lora_state_dict(model), config, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="does not exist"):
        merge_adapter(tmp_path / "no_base", adapter_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
