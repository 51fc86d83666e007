"""Fused q/k/v and gate/up projections (`ft.generation.fused_projections`): the same
logits and greedy tokens as separate projections (Llama; Qwen2 with q/k/v biases;
Qwen3 with q/k norms and its own head_dim), no extra memory, the state dict, export
and training untouched, and the unfused path kept where fusion would be wrong."""

from __future__ import annotations

import copy

import pytest
import torch
from generation_helpers import IdTokenizer, random_prompts

from ft.generation import DecodeOptions, GenerateStats, Generator, GeneratorConfig
from ft.generation.fused_projections import fuse_projections, fused_projections, unfuse_projections
from ft.lora.layers import LoraLinear
from ft.models import build_model
from ft.models.hf_export import save_hf_model

ARCHS = ["llama_debug", "qwen2_debug", "qwen3_debug"]


def _model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A random float32 model whose norms and biases are random too (zeros would hide a mix-up)."""
    model = build_model(arch, device="cpu", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model.eval()


def _layer(model):
    return model.model.layers[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_logits_match_separate_projections(arch):
    model = _model(arch, seed=1)
    tokens_BT = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        separate_BTV = model(tokens_BT)
        with fused_projections(model) as num_fused:
            assert _layer(model).self_attn.qkv_weight is not None
            fused_BTV = model(tokens_BT)
    assert num_fused == 2 * model.config.n_layers  # every attention and every MLP
    torch.testing.assert_close(fused_BTV, separate_BTV, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_generator_gives_the_unfused_tokens(arch):
    model = _model(arch, seed=3)
    prompts = random_prompts([9, 3, 6], vocab_size=256, seed=4)
    config = GeneratorConfig(greedy=True, max_gen_len=24, batch_size=len(prompts))

    def run(fused: bool):
        generator = Generator(model, IdTokenizer(stop_ids=()), config,
                              decode_options=DecodeOptions(fused_projections=fused))
        return generator(prompts)

    unfused, fused = run(False), run(True)
    assert [f.tokens for f in fused] == [u.tokens for u in unfused]
    assert all(len(f.tokens) == 24 for f in fused)
    for f, u in zip(fused, unfused):
        torch.testing.assert_close(torch.tensor(f.logprobs), torch.tensor(u.logprobs), atol=1e-5, rtol=1e-5)
    # Fused only during the call: afterwards the model computes each projection alone.
    assert _layer(model).self_attn.qkv_weight is None and _layer(model).mlp.gate_up_weight is None


def test_state_dict_and_export_are_unchanged(tmp_path):
    model = _model("qwen2_debug", seed=5)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    bytes_before = sum(p.numel() * p.element_size() for p in model.parameters())
    reference = copy.deepcopy(model)
    with fused_projections(model):
        during = model.state_dict()
        assert list(during) == list(before)  # no fused keys: the buffers are non-persistent
    after = model.state_dict()
    assert list(after) == list(before)
    for name, tensor in after.items():
        assert torch.equal(tensor, before[name]), name
    # The projections became views of one tensor per layer: no memory added.
    attn, mlp = _layer(model).self_attn, _layer(model).mlp
    storage = attn.q_proj.weight.untyped_storage().data_ptr()
    assert attn.k_proj.weight.untyped_storage().data_ptr() == storage
    assert attn.v_proj.bias.untyped_storage().data_ptr() == attn.q_proj.bias.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_proj.weight.untyped_storage().data_ptr()
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == bytes_before
    # The HF export of the fused model is byte for byte the unfused one's.
    files = save_hf_model(model, tmp_path / "fused", dtype=torch.float32)
    reference_files = save_hf_model(reference, tmp_path / "reference", dtype=torch.float32)
    assert [f.name for f in files] == [f.name for f in reference_files]
    for a, b in zip(files, reference_files):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_a_fused_model_still_trains_like_the_original():
    model = _model("llama_debug", seed=6)
    reference = copy.deepcopy(model)
    with fused_projections(model):
        pass
    tokens_BT = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(7))
    for m in (model, reference):
        m.train()
        m(tokens_BT).float().logsumexp(-1).mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.grad is not None and torch.equal(p.grad, q.grad), name
    # An in-place update of a projection (an optimizer step, load_state_dict) reaches the fused tensor.
    with torch.no_grad():
        _layer(model).self_attn.k_proj.weight.add_(1.0)
        with fused_projections(model):
            attn = _layer(model).self_attn
            q_rows, k_rows = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
            assert torch.equal(attn.qkv_weight[q_rows : q_rows + k_rows], attn.k_proj.weight)


def test_fusing_again_reuses_the_fused_storage_and_refuses_after_a_move():
    model = _model("llama_debug")
    fuse_projections(model)
    first = _layer(model).mlp.gate_up_weight
    unfuse_projections(model)
    fuse_projections(model)
    assert _layer(model).mlp.gate_up_weight.data_ptr() == first.data_ptr()  # a view again, no copy
    model.to(torch.float64)  # gives each parameter and buffer its own storage
    fuse_projections(model)
    mlp = _layer(model).mlp
    assert mlp.gate_up_weight.dtype == torch.float64
    assert mlp.gate_proj.weight.data_ptr() == mlp.gate_up_weight.data_ptr()
    unfuse_projections(model)


def test_lora_projections_stay_unfused():
    model = _model("llama_debug")
    attn = _layer(model).self_attn
    attn.q_proj = LoraLinear.wrap(attn.q_proj, rank=2, alpha=4.0, dropout=0.0, dtype=torch.float32)
    torch.nn.init.normal_(attn.q_proj.lora_B.weight)  # a nonzero adapter, so skipping it would show
    tokens_BT = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        separate_BTV = model(tokens_BT)
        with fused_projections(model) as num_fused:
            assert attn.qkv_weight is None and _layer(model).mlp.gate_up_weight is not None
            fused_BTV = model(tokens_BT)
    assert num_fused == 2 * model.config.n_layers - 1  # every module but the LoRA attention
    torch.testing.assert_close(fused_BTV, separate_BTV, atol=1e-5, rtol=1e-5)


def test_nf4_weights_stay_unfused():
    pytest.importorskip("torchao")
    from ft.lora.quant import to_nf4

    model = _model("llama_debug")
    mlp = _layer(model).mlp
    mlp.gate_proj.weight = torch.nn.Parameter(to_nf4(mlp.gate_proj.weight.detach(), dtype=torch.float32,
                                                     name="gate_proj"), requires_grad=False)
    with fused_projections(model) as num_fused:
        assert mlp.gate_up_weight is None and _layer(model).self_attn.qkv_weight is not None
    assert num_fused == 2 * model.config.n_layers - 1


def test_disabled_option_leaves_the_model_unfused():
    model = _model("llama_debug")
    with fused_projections(model, enabled=False) as num_fused:
        assert num_fused == 0 and _layer(model).self_attn.qkv_weight is None
    assert _layer(model).self_attn.q_proj.weight.untyped_storage().data_ptr() != \
        _layer(model).self_attn.k_proj.weight.untyped_storage().data_ptr()


def test_compiled_fused_step_gives_the_eager_unfused_tokens():
    model = _model("qwen3_debug", seed=9)
    prompts = random_prompts([7, 2], vocab_size=256, seed=10)

    def run(fused: bool, compile: bool):
        config = GeneratorConfig(greedy=True, max_gen_len=12, batch_size=len(prompts), compile=compile)
        stats = GenerateStats()
        options = DecodeOptions(fused_projections=fused)
        generator = Generator(model, IdTokenizer(stop_ids=()), config, decode_options=options)
        return generator(prompts, stats=stats), stats.decode_path

    eager, _ = run(False, False)
    compiled, path = run(True, True)
    if path == "eager":
        pytest.skip("torch.compile is unavailable here (the step fell back to eager, as designed)")
    assert [c.tokens for c in compiled] == [e.tokens for e in eager]
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(e.logprobs), atol=1e-5, rtol=1e-5)
