"""The native Llama module: meta build, buffers after to_empty, packed documents,
KV-cache decoding, init, FLOPs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ft.errors import ConfigError
from ft.generation import StaticKVCache
from ft.models import build_model, model_flops_per_token
from ft.models.llama.model import (
    LLAMA_ARCHS,
    Llama,
    document_causal_mask,
    get_llama_arch,
    num_parameters,
    update_llama_config,
)

DEBUG = get_llama_arch("llama_debug")


def test_meta_build_of_llama3_1_8b_allocates_nothing():
    model = build_model("llama3_1_8b")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "meta" for b in model.buffers())
    assert sum(p.numel() for p in model.parameters()) == num_parameters(LLAMA_ARCHS["llama3_1_8b"])
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(8.03e9, rel=1e-3)


def test_state_dict_keys_are_hf_names():
    model = build_model("llama_debug")
    keys = set(model.state_dict())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" in keys and "model.norm.weight" in keys
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
        assert f"model.layers.1.{name}.weight" in keys
    assert not any("rotary" in k for k in keys)  # RoPE tables are non-persistent


def test_to_empty_then_reset_buffers_matches_direct_build():
    direct = Llama(DEBUG)
    with torch.device("meta"):
        model = Llama(DEBUG)
    model.to_empty(device="cpu")
    model.reset_buffers()
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, direct.model.rotary_emb.inv_freq, rtol=0, atol=0)
    # Tied weights survive to_empty.
    tied = build_model("llama_debug_tied", device="cpu")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_rope_table_stays_float32_under_dtype_cast():
    model = build_model("llama_debug", device="cpu", dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, Llama(DEBUG).model.rotary_emb.inv_freq, rtol=0, atol=0)


def test_init_weights_is_seeded_and_hf_like():
    a = build_model("llama_debug", device="cpu", seed=3)
    b = build_model("llama_debug", device="cpu", seed=3)
    c = build_model("llama_debug", device="cpu", seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" in name:
            assert torch.equal(pa, torch.ones_like(pa))
        else:
            assert not torch.equal(pa, pc)
            assert pa.std().item() == pytest.approx(0.02, rel=0.2)


def test_return_hidden_feeds_lm_head():
    model = build_model("llama_debug", device="cpu", seed=0)
    tokens_BT = torch.randint(0, DEBUG.vocab_size, (2, 12))
    with torch.no_grad():
        hidden_BTD = model(tokens_BT, return_hidden=True)
        assert hidden_BTD.shape == (2, 12, DEBUG.dim)
        torch.testing.assert_close(model.lm_head(hidden_BTD), model(tokens_BT))


def test_explicit_positions_equal_default_and_shift_changes_output():
    model = build_model("llama_debug", device="cpu", seed=0)
    tokens_BT = torch.randint(0, DEBUG.vocab_size, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens_BT, positions_BT=torch.arange(10)[None]), model(tokens_BT))
        assert not torch.allclose(model(tokens_BT, positions_BT=torch.arange(5, 15)[None]), model(tokens_BT))


def _pack(docs: list[torch.Tensor], length: int, pad_token: int = 0):
    tokens, positions, doc_ids = [], [], []
    for i, d in enumerate(docs):
        tokens.append(d)
        positions.append(torch.arange(len(d)))
        doc_ids.append(torch.full((len(d),), i))
    n_pad = length - sum(len(d) for d in docs)
    tokens.append(torch.full((n_pad,), pad_token))
    positions.append(torch.arange(n_pad))
    doc_ids.append(torch.full((n_pad,), -1))
    return torch.cat(tokens)[None], torch.cat(positions)[None], torch.cat(doc_ids)[None]


@pytest.mark.parametrize("arch", ["llama_debug", "llama_debug_tied"])
def test_packed_documents_equal_each_document_alone(arch):
    model = build_model(arch, device="cpu", seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 256, (n,), generator=gen) for n in (7, 1, 12, 5)]
    tokens_BT, positions_BT, doc_ids_BT = _pack(docs, 30)
    with torch.no_grad():
        packed_BTV = model(tokens_BT, positions_BT=positions_BT, document_ids_BT=doc_ids_BT)
        assert torch.isfinite(packed_BTV).all()  # padding rows too
        start = 0
        for d in docs:
            alone_TV = model(d[None])[0]
            torch.testing.assert_close(packed_BTV[0, start : start + len(d)], alone_TV, rtol=1e-5, atol=1e-5)
            start += len(d)
        # Without the document mask the later documents would differ.
        unmasked = model(tokens_BT, positions_BT=positions_BT)
        assert not torch.allclose(unmasked[0, 7:8], packed_BTV[0, 7:8], atol=1e-4)


def test_document_mask_allows_only_earlier_tokens_of_same_document():
    doc_ids_BT = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mask = document_causal_mask(doc_ids_BT)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_flex_block_mask_agrees_with_boolean_mask():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    doc_ids_BT = torch.tensor([[0] * 70 + [1] * 100 + [-1] * 86])
    block_mask = document_causal_mask(doc_ids_BT, use_flex=True)
    assert isinstance(block_mask, flex.BlockMask)
    dense = block_mask.to_dense()  # [B, H, q_blocks, kv_blocks]: which blocks are computed at all
    bool_mask = document_causal_mask(doc_ids_BT)[0, 0]
    bs = block_mask.BLOCK_SIZE[0]
    for qb in range(dense.shape[2]):
        for kb in range(dense.shape[3]):
            any_allowed = bool_mask[qb * bs : (qb + 1) * bs, kb * bs : (kb + 1) * bs].any().item()
            assert bool(dense[0, 0, qb, kb]) == any_allowed


@pytest.mark.parametrize("arch", ["llama_debug", "llama_debug_tied"])
def test_kv_cache_decoding_with_left_padding_equals_full_forward(arch):
    model = build_model(arch, device="cpu", seed=1).eval()
    gen = torch.Generator().manual_seed(2)
    lengths = [3, 6, 1]
    new = 5
    seqs = [torch.randint(0, 256, (n + new,), generator=gen) for n in lengths]
    t0 = max(lengths)
    prompt_BT = torch.zeros(len(seqs), t0, dtype=torch.long)
    prompt_mask_BT = torch.zeros(len(seqs), t0, dtype=torch.bool)
    for b, (s, n) in enumerate(zip(seqs, lengths)):
        prompt_BT[b, t0 - n :] = s[:n]
        prompt_mask_BT[b, t0 - n :] = True
    cache = StaticKVCache(model, batch_size=len(seqs), max_len=t0 + new)
    cache.reset(prompt_mask_BT)
    positions_BT = (prompt_mask_BT.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        prefill_BTV = model(prompt_BT, positions_BT=positions_BT, kv_cache=cache)
        assert int(cache.slot) == t0
        steps = [prefill_BTV[:, -1]]
        pos_B1 = positions_BT[:, -1:]
        for i in range(new - 1):
            pos_B1 = pos_B1 + 1
            next_B1 = torch.stack([s[n + i] for s, n in zip(seqs, lengths)])[:, None]
            steps.append(model(next_B1, positions_BT=pos_B1, kv_cache=cache)[:, 0])
        for b, (s, n) in enumerate(zip(seqs, lengths)):
            full_TV = model(s[None])[0]
            torch.testing.assert_close(prefill_BTV[b, t0 - n :], full_TV[:n], rtol=1e-5, atol=1e-5)
            for i, step_BV in enumerate(steps):
                torch.testing.assert_close(step_BV[b], full_TV[n - 1 + i], rtol=1e-5, atol=1e-5)


def test_kv_cache_reorder_selects_rows():
    model = build_model("llama_debug", device="cpu", seed=1).eval()
    prompt_BT = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(0))
    cache = StaticKVCache(model, batch_size=3, max_len=8)
    cache.reset(torch.ones(3, 4, dtype=torch.bool))
    with torch.no_grad():
        model(prompt_BT, positions_BT=torch.arange(4).expand(3, 4), kv_cache=cache)
        cache.reorder(torch.tensor([2, 2, 0]))  # beam search: row 2 twice, row 0 once
        next_B1 = torch.tensor([[5], [9], [7]])
        out_BV = model(next_B1, positions_BT=torch.full((3, 1), 4), kv_cache=cache)[:, 0]
        for b, src in enumerate([2, 2, 0]):
            full = model(torch.cat([prompt_BT[src], next_B1[b]])[None])[0, -1]
            torch.testing.assert_close(out_BV[b], full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="positions_BT"):
        model(torch.zeros(3, 1, dtype=torch.long), kv_cache=cache)


def test_model_flops_per_token_matches_parameter_count():
    config = LLAMA_ARCHS["llama3_2_1b"]
    model = build_model(config)
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    expected = 6 * (non_embedding + config.vocab_size * config.dim) + 12 * 16 * 32 * 64 * 2048
    assert model_flops_per_token(config, 2048) == expected


def test_unknown_arch_lists_known_names():
    with pytest.raises(ConfigError, match="llama3_2_1b") as info:
        get_llama_arch("llama3_2_1")
    assert "did you mean 'llama3_2_1b'" in str(info.value)


def test_config_overrides_are_checked():
    config = update_llama_config(LLAMA_ARCHS["ft_tiny"], {"n_layers": 2, "rope_scaling": {"rope_type": "llama3", "factor": 4.0}})
    assert config.n_layers == 2 and config.rope_scaling.factor == 4.0
    with pytest.raises(ConfigError, match="did you mean 'n_layers'"):
        update_llama_config(LLAMA_ARCHS["ft_tiny"], {"num_layers": 2})
    with pytest.raises(ConfigError, match="n_kv_heads"):
        dataclasses.replace(LLAMA_ARCHS["ft_tiny"], n_kv_heads=3)


def test_ft_tiny_is_the_embedded_default_size():
    c = LLAMA_ARCHS["ft_tiny"]
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim) == (1024, 128, 4, 4, 2, 384)
    assert c.tie_embeddings and c.max_seq_len == 1024 and c.bos_id == 1 and c.eos_id == 2


@pytest.mark.slow
def test_flex_attention_path_equals_sdpa_mask(monkeypatch):
    """The CUDA packed-row path (compiled FlexAttention), run on CPU here."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from ft.models.llama import model as model_module

    model = build_model("llama_debug", device="cpu", seed=0).eval()
    docs = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (50, 60)]
    tokens_BT, positions_BT, doc_ids_BT = _pack(docs, 128)
    with torch.no_grad():
        expected = model(tokens_BT, positions_BT=positions_BT, document_ids_BT=doc_ids_BT)
        boolean_mask = model_module.document_causal_mask
        monkeypatch.setattr(model_module, "document_causal_mask", lambda d: boolean_mask(d, use_flex=True))
        try:
            actual = model(tokens_BT, positions_BT=positions_BT, document_ids_BT=doc_ids_BT)
        except Exception as error:  # no C++ toolchain for inductor on this machine
            pytest.skip(f"compiled flex_attention unavailable on CPU: {error}")
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_flex_attention_in_a_compiled_block_is_traced_without_side_effects(monkeypatch):
    """Inside a compiled (checkpointed) block the attention must be traced into the block's
    graph: creating the compiled kernel there mutated module state during the trace, which
    dynamo answers with a recompile or, inside a checkpoint, by running the block eagerly."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    import torch._dynamo.utils as dynamo_utils
    from torch.utils.checkpoint import checkpoint

    from ft.models.llama import model as model_module

    monkeypatch.setattr(model_module, "_compiled_flex_attention", None)
    q_BNTH, k_BKTH, v_BKTH = (torch.randn(1, n, 128, 16, generator=torch.Generator().manual_seed(n)) for n in (4, 2, 3))
    doc_ids_BT = torch.cat([torch.zeros(1, 50, dtype=torch.long), torch.ones(1, 78, dtype=torch.long)], dim=1)
    mask = document_causal_mask(doc_ids_BT, use_flex=True)

    def block(q, k, v):
        return checkpoint(lambda q, k, v: model_module._flex_attention(q * 2, k, v, mask), q, k, v,
                          use_reentrant=False).sum()

    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    compiled = torch.compile(block)
    try:
        first = compiled(q_BNTH, k_BKTH, v_BKTH)
        second = compiled(q_BNTH, k_BKTH, v_BKTH)
    except Exception as error:  # no C++ toolchain for inductor on this machine
        pytest.skip(f"compiled flex_attention unavailable on CPU: {error}")
    assert model_module._compiled_flex_attention is None  # the trace set no module state
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1  # one graph: no break, no recompile
    assert not dynamo_utils.counters["graph_break"]
    torch.testing.assert_close(first, second)
