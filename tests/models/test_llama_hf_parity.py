"""Parity with transformers' LlamaForCausalLM: HF save_pretrained -> ft, Meta
consolidated layout -> ft, ft export -> transformers, config.json of every arch."""

from __future__ import annotations

import json

import pytest
import torch

from ft.models import load_model
from ft.models.llama.model import LLAMA_ARCHS
from ft.models.hf_export import save_hf_model, write_hf_config

transformers = pytest.importorskip("transformers")

SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 32}

CASES = {
    # GQA + llama3 rope scaling, untied (Llama 3.1 style)
    "gqa_scaled_untied": dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=SCALING),
    # GQA + scaling, tied (Llama 3.2 1B/3B style)
    "gqa_scaled_tied": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=SCALING),
    # MHA, no scaling (Llama 2 style)
    "mha_plain": dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0),
}


def make_hf_model(case: str, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **CASES[case],
    )
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # norms are ones at init; randomize them so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
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


TOKENS_BT = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", list(CASES))
def test_hf_save_pretrained_loads_with_same_logits(tmp_path, case):
    hf = make_hf_model(case)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = load_model(tmp_path, dtype=torch.float32)
    assert model.config.tie_embeddings == CASES[case]["tie_word_embeddings"]
    assert (model.config.rope_scaling is not None) == ("rope_scaling" in CASES[case])
    with torch.no_grad():
        assert_close_rel(model(TOKENS_BT), hf_logits(hf, TOKENS_BT))


def test_hf_sharded_dir_loads(tmp_path):
    hf = make_hf_model("gqa_scaled_untied")
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model = load_model(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert_close_rel(model(TOKENS_BT), hf_logits(hf, TOKENS_BT))


# --- Meta layout -------------------------------------------------------------------


def hf_to_meta_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of the Meta->HF permute: rotate-half halves back to interleaved pairs."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_state_to_meta(hf, *, num_shards: int, embed_split_dim: int) -> list[dict[str, torch.Tensor]]:
    c = hf.config
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    meta = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],  # Meta stores it even for tied models
        "rope.freqs": torch.zeros(8),
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        meta[f"layers.{i}.attention.wq.weight"] = hf_to_meta_permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads)
        meta[f"layers.{i}.attention.wk.weight"] = hf_to_meta_permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads)
        meta[f"layers.{i}.attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        meta[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        meta[f"layers.{i}.feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        meta[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        meta[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        meta[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        meta[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for key, t in meta.items():
        leaf = key.split(".")[-2]
        if t.ndim == 1:
            parts = [t] * num_shards
        elif key == "tok_embeddings.weight":
            parts = t.chunk(num_shards, dim=embed_split_dim)
        else:
            parts = t.chunk(num_shards, dim=1 if leaf in ("wo", "w2") else 0)
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    return shards


def write_meta(directory, hf, *, num_shards: int, embed_split_dim: int = 0) -> None:
    c = hf.config
    for i, shard in enumerate(hf_state_to_meta(hf, num_shards=num_shards, embed_split_dim=embed_split_dim)):
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")
    rope = c.rope_scaling if hasattr(c, "rope_scaling") and c.rope_scaling else None
    rope = rope or getattr(c, "rope_parameters", None) or {}
    params = {
        "dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads, "vocab_size": c.vocab_size, "norm_eps": c.rms_norm_eps,
        # 4*64*2/3 = 170 -> multiplier picks 96 back: int(170 * 0.5647) = 95 -> rounded up to 96
        "multiple_of": 32, "ffn_dim_multiplier": 0.5647,
        "rope_theta": rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)),
        "tie_embeddings": c.tie_word_embeddings,
    }
    if rope.get("rope_type") == "llama3":
        params.update(use_scaled_rope=True, rope_scaling_factor=rope["factor"],
                      original_max_position_embeddings=rope["original_max_position_embeddings"])
    (directory / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("num_shards,embed_split_dim", [(1, 0), (2, 0), (2, 1)])
def test_meta_consolidated_loads_with_same_logits(tmp_path, case, num_shards, embed_split_dim):
    hf = make_hf_model(case)
    write_meta(tmp_path, hf, num_shards=num_shards, embed_split_dim=embed_split_dim)
    model = load_model(tmp_path, dtype=torch.float32)
    assert model.config.ffn_dim == 96
    with torch.no_grad():
        assert_close_rel(model(TOKENS_BT), hf_logits(hf, TOKENS_BT))
    # A card may point at one shard file; the whole set beside it is loaded.
    model = load_model(tmp_path / "consolidated.00.pth", dtype=torch.float32)
    with torch.no_grad():
        assert_close_rel(model(TOKENS_BT), hf_logits(hf, TOKENS_BT))


# --- Export ------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("max_shard_size_bytes", [10**9, 30_000])
def test_ft_export_loads_in_transformers(tmp_path, case, max_shard_size_bytes):
    hf = make_hf_model(case)
    hf.save_pretrained(tmp_path / "src", safe_serialization=True)
    model = load_model(tmp_path / "src", dtype=torch.float32)
    written = save_hf_model(model, tmp_path / "out", dtype=torch.float32, max_shard_size_bytes=max_shard_size_bytes)
    sharded = max_shard_size_bytes < 10**9
    assert (len(written) > 1) == sharded
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file() == sharded
    reloaded = hf_from_pretrained(tmp_path / "out")
    assert reloaded.config.tie_word_embeddings == CASES[case]["tie_word_embeddings"]
    with torch.no_grad():
        assert_close_rel(hf_logits(reloaded, TOKENS_BT), hf_logits(hf, TOKENS_BT))
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
    assert gen.eos_token_id == 2 and gen.bos_token_id == 1


def test_export_in_bf16_records_dtype(tmp_path):
    hf = make_hf_model("gqa_scaled_tied")
    hf.save_pretrained(tmp_path / "src", safe_serialization=True)
    save_hf_model(load_model(tmp_path / "src"), tmp_path / "out")  # default: bfloat16
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert load_model(tmp_path / "out").model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("arch", sorted(LLAMA_ARCHS))
def test_config_json_of_every_arch_loads_in_transformers(tmp_path, arch):
    config = LLAMA_ARCHS[arch]
    write_hf_config(config, tmp_path)
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(hf, transformers.LlamaConfig)
    assert hf.vocab_size == config.vocab_size
    assert hf.hidden_size == config.dim
    assert hf.intermediate_size == config.ffn_dim
    assert hf.num_hidden_layers == config.n_layers
    assert hf.num_attention_heads == config.n_heads
    assert hf.num_key_value_heads == config.n_kv_heads
    assert hf.head_dim == config.head_dim
    assert hf.tie_word_embeddings == config.tie_embeddings
    assert hf.rms_norm_eps == config.norm_eps
    assert hf.max_position_embeddings == config.max_seq_len
    assert hf.eos_token_id == config.eos_id
    rope = getattr(hf, "rope_parameters", None) or hf.rope_scaling or {}
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", None))
    assert theta == config.rope_theta
    if config.rope_scaling is None:
        assert rope.get("rope_type", "default") == "default"
    else:
        assert rope["rope_type"] == "llama3"
        assert rope["factor"] == config.rope_scaling.factor
        assert rope["original_max_position_embeddings"] == config.rope_scaling.original_max_position_embeddings
    # The RoPE frequencies transformers derives from it equal ours.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from ft.models.llama.model import rope_inv_freq

    rope_type = rope.get("rope_type", "default")
    init = ROPE_INIT_FUNCTIONS.get(rope_type) if rope_type != "default" else None
    if init is not None:
        expected, _ = init(hf, "cpu")
        torch.testing.assert_close(rope_inv_freq(config), expected.float())


def test_system_arch_sizes_are_the_published_ones():
    from ft.models.llama.model import num_parameters

    billions = {name: num_parameters(LLAMA_ARCHS[name]) / 1e9 for name in LLAMA_ARCHS}
    assert billions["llama2_7b"] == pytest.approx(6.74, abs=0.01)
    assert billions["llama2_13b"] == pytest.approx(13.02, abs=0.01)
    assert billions["llama3_8b"] == pytest.approx(8.03, abs=0.01)
    assert billions["llama3_1_70b"] == pytest.approx(70.55, abs=0.01)
    assert billions["llama3_2_1b"] == pytest.approx(1.24, abs=0.01)
    assert billions["llama3_2_3b"] == pytest.approx(3.21, abs=0.01)
    assert num_parameters(LLAMA_ARCHS["ft_tiny"]) < 3_000_000
