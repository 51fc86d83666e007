"""The native Llama family: `LlamaConfig`, the named archs in `LLAMA_ARCHS`, the
`Llama` module (Hugging Face parameter names and rotate-half RoPE, so an HF
`LlamaForCausalLM` state dict loads as it is).

The model knows nothing of parallelism: plain `nn.Linear` / `nn.Embedding`. It is
meant to be built on the meta device, parallelized from outside, materialized with
`to_empty(device=...)`, then given its RoPE tables back with `reset_buffers()` (they
are non-persistent, so no checkpoint restores them) and its weights with
`init_weights()` or a checkpoint load.

Attention goes through `scaled_dot_product_attention`:
- plain causal rows use `is_causal=True` (flash / cuDNN kernels on GPU);
- packed rows (`document_ids_BT`) use a document-causal mask: a FlexAttention block
  mask on CUDA, a boolean SDPA mask elsewhere;
- decoding (`kv_cache=`) attends over the cache with a causal + key padding mask (or,
  when the cache hands a `DecodeKeyMask`, through ft's split-KV decoding kernels).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ft.errors import ConfigError
from ft.models.attention_mask import DecodeKeyMask, FlexKeyMask
from ft.models.decode_attention import split_kv_decode_attention
from ft.models import tied_embedding
from ft.models.family_bundle import KVCache
from ft.registry import Registry


@dataclass(kw_only=True, frozen=True)
class LlamaRopeScaling:
    """Llama 3.1 RoPE frequency scaling (HF `rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(kw_only=True, frozen=True)
class LlamaConfig:
    """Sizes and settings of one Llama model (names follow Meta's params.json;
    `ft.models.llama.hf` maps them to HF's config.json)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    rope_scaling: LlamaRopeScaling | None = None
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    bos_id: int = 1
    eos_id: int | list[int] = 2
    pad_id: int | None = None
    init_std: float = 0.02

    # Options of the shared modules that other families built on them set as fields
    # (Qwen2: q/k/v bias; Qwen3: per-head q/k RMSNorm); a Llama has neither.
    attention_bias: ClassVar[bool] = False
    qk_norm: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"Llama dim={self.dim} is not a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"Llama n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"Llama head_dim={self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def eos_ids(self) -> list[int]:
        return [self.eos_id] if isinstance(self.eos_id, int) else list(self.eos_id)


def update_llama_config(config: LlamaConfig, overrides: Mapping[str, Any], *, source: str = "model_config") -> LlamaConfig:
    """`config` with `overrides` (e.g. a card's `model_config`) applied.

    Unknown keys raise ConfigError naming the key and the closest field;
    `rope_scaling` may be a dict of `LlamaRopeScaling` fields or None.
    """
    values = dict(overrides)
    check_config_keys(config, values, source=source, family="Llama")
    scaling = values.get("rope_scaling")
    if isinstance(scaling, Mapping):
        scaling = {k: v for k, v in scaling.items() if k not in ("rope_type", "type")}
        scaling_names = [f.name for f in dataclasses.fields(LlamaRopeScaling)]
        for key in scaling:
            if key not in scaling_names:
                raise ConfigError(f"{source}: unknown rope_scaling key {key!r}; known: {', '.join(scaling_names)}")
        values["rope_scaling"] = LlamaRopeScaling(**scaling)
    return dataclasses.replace(config, **values)


def check_config_keys(config: Any, overrides: Mapping[str, Any], *, source: str, family: str) -> None:
    """ConfigError naming the first key of `overrides` that is no field of `config`'s dataclass."""
    names = [f.name for f in dataclasses.fields(config)]
    for key in overrides:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{source}: unknown {family} config key {key!r}{hint}")


LLAMA_ARCHS: Registry[LlamaConfig] = Registry("Llama arch")


def register_llama_arch(name: str, config: LlamaConfig) -> None:
    LLAMA_ARCHS.register(name, config)


def get_llama_arch(name: str) -> LlamaConfig:
    """The named arch; ConfigError listing the known names on a miss."""
    return LLAMA_ARCHS.get(name)


def _register_archs() -> None:
    def arch(name: str, **fields: Any) -> None:
        register_llama_arch(name, LlamaConfig(**fields))

    llama2 = dict(vocab_size=32000, norm_eps=1e-5, rope_theta=10_000.0, max_seq_len=4096, bos_id=1, eos_id=2)
    arch("llama2_7b", dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, **llama2)
    arch("llama2_13b", dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824, **llama2)

    llama3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500_000.0, bos_id=128000, eos_id=128001)
    arch("llama3_8b", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, max_seq_len=8192, **llama3)
    scaled = dict(llama3, max_seq_len=131072, rope_scaling=LlamaRopeScaling(factor=8.0))
    arch("llama3_1_8b", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, **scaled)
    arch("llama3_1_70b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, **scaled)
    small = dict(scaled, rope_scaling=LlamaRopeScaling(factor=32.0), tie_embeddings=True)
    arch("llama3_2_1b", dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, **small)
    arch("llama3_2_3b", dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192, **small)
    # 3.3 exists only as an instruct model; its HF config stops on <|end_of_text|>, <|eom_id|>, <|eot_id|>.
    instruct = dict(scaled, eos_id=[128001, 128008, 128009])
    arch("llama3_3_70b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, **instruct)

    # Debug sizes for tests: GQA, llama3 scaling (a short original context so it matters), tied and untied.
    debug = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=256)
    debug_scaling = LlamaRopeScaling(factor=8.0, original_max_position_embeddings=64)
    arch("llama_debug", rope_theta=500_000.0, rope_scaling=debug_scaling, **debug)
    arch("llama_debug_tied", tie_embeddings=True, **debug)
    # The embedded default model (ft/assets/default), paired with a 1024-piece SentencePiece tokenizer.
    arch(
        "ft_tiny", vocab_size=1024, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, tie_embeddings=True,
        max_seq_len=1024, rope_theta=10_000.0, bos_id=1, eos_id=2,
    )


_register_archs()


# ---------------------------------------------------------------------------------
# Modules


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the scale, as HF's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BTD: Tensor) -> Tensor:
        x32_BTD = x_BTD.float()
        x32_BTD = x32_BTD * torch.rsqrt(x32_BTD.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32_BTD.to(x_BTD.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_inv_freq(config: LlamaConfig, device: torch.device | str | None = None) -> Tensor:
    """Inverse RoPE frequencies [head_dim/2] in float32, with llama3 scaling as HF computes it."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Holds the non-persistent `inv_freq` table; gives cos/sin for given positions.

    cos/sin are computed per call from positions (cheap: [B, T, head_dim]) rather than
    precomputed for max_seq_len, which for Llama 3.1 (131072 positions) would be a
    large table for nothing.
    """

    inv_freq: Tensor

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def reset_buffers(self) -> None:
        self.inv_freq = rope_inv_freq(self.config, device=self.inv_freq.device)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # `model.to(bfloat16)` would round the frequencies; the table stays float32.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.reset_buffers()
        return self

    def forward(self, positions_BT: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs_BTh = positions_BT.float()[:, :, None] * self.inv_freq[None, None, :]
        angles_BTH = torch.cat((freqs_BTh, freqs_BTh), dim=-1)
        return angles_BTH.cos().to(dtype), angles_BTH.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BNTH: Tensor, cos_BTH: Tensor, sin_BTH: Tensor) -> Tensor:
    """Rotate-half RoPE (HF layout: the two halves of each head pair up)."""
    return x_BNTH * cos_BTH[:, None] + _rotate_half(x_BNTH) * sin_BTH[:, None]


# An attention mask: None (plain causal), a boolean SDPA mask [B, 1, T, S] (True =
# attend), a FlexAttention BlockMask, a `FlexKeyMask` or a `DecodeKeyMask`.
AttentionMask = Any


_compiled_flex_attention = None


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, mask: Any) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    kwargs = dict(score_mod=mask.score_mod()) if isinstance(mask, FlexKeyMask) else dict(block_mask=mask)
    if torch.compiler.is_compiling():
        # In a compiled block: traced into the block's graph. Creating the compiled function
        # here would be a side effect in the trace; inside a checkpointed block that made
        # dynamo run the whole block eagerly (every matmul, forward and recompute).
        return flex_attention(q, k, v, enable_gqa=True, **kwargs)
    if not q.is_cuda and isinstance(mask, FlexKeyMask):
        return flex_attention(q, k, v, enable_gqa=True, **kwargs)  # eager reference path off the GPU
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        # Uncompiled flex_attention is a slow reference path; compiled it is a fused kernel.
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention(q, k, v, enable_gqa=True, **kwargs)


def _masked_sdpa(q_BNTH: Tensor, k_BKSH: Tensor, v_BKSH: Tensor, mask_B1TS: Tensor) -> Tensor:
    """GQA attention under a mask, without copying keys/values per query head.

    SDPA's `enable_gqa` runs only in the flash kernel (which takes no mask) and the math
    kernel (which repeats every KV head G times, in float32). Instead the G query heads
    that share a KV head are folded into the query length, [B, K, G*T, H] with rows
    ordered (g, t), and the mask tiled to match: the memory-efficient kernel then reads
    each KV head once. Decoding (T = 1, a long cache) is where this matters.
    """
    B, N, T, H = q_BNTH.shape
    K = k_BKSH.shape[1]
    G = N // K
    q_BKMH = q_BNTH.reshape(B, K, G * T, H)
    mask_B1MS = mask_B1TS.repeat(1, 1, G, 1)
    o_BKMH = F.scaled_dot_product_attention(q_BKMH, k_BKSH, v_BKSH, attn_mask=mask_B1MS)
    return o_BKMH.reshape(B, N, T, H)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        # Head counts are not kept: under tensor parallelism a rank holds only its
        # share of the heads, so forward reads them from the projections' outputs.
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)
        # Qwen3: RMSNorm over each head's vector of queries and keys, before RoPE.
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        # Generation only (`ft.generation.fused_projections`): q/k/v weights (and biases)
        # concatenated, so one matmul replaces three. Not in the state dict; None otherwise.
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)

    def forward(
        self, x_BTD: Tensor, cos_BTH: Tensor, sin_BTH: Tensor, mask: AttentionMask, kv_cache: KVCache | None
    ) -> Tensor:
        B, T, _ = x_BTD.shape
        if self.qkv_weight is not None:
            sizes = [self.q_proj.weight.shape[0], self.k_proj.weight.shape[0], self.v_proj.weight.shape[0]]
            q_BTO, k_BTO, v_BTO = F.linear(x_BTD, self.qkv_weight, self.qkv_bias).split(sizes, dim=-1)
        else:
            q_BTO, k_BTO, v_BTO = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        q_BTNH = q_BTO.view(B, T, -1, self.head_dim)
        k_BTKH = k_BTO.view(B, T, -1, self.head_dim)
        if self.q_norm is not None:
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        q_BNTH = q_BTNH.transpose(1, 2)
        k_BKTH = k_BTKH.transpose(1, 2)
        v_BKTH = v_BTO.view(B, T, -1, self.head_dim).transpose(1, 2)
        q_BNTH = apply_rope(q_BNTH, cos_BTH, sin_BTH)
        k_BKTH = apply_rope(k_BKTH, cos_BTH, sin_BTH)
        if kv_cache is not None:
            k_BKTH, v_BKTH = kv_cache.update(self.layer_idx, k_BKTH, v_BKTH)  # now [B, K, S, H]
        gqa = k_BKTH.shape[1] != q_BNTH.shape[1]
        if mask is None:
            o_BNTH = F.scaled_dot_product_attention(q_BNTH, k_BKTH, v_BKTH, is_causal=True, enable_gqa=gqa)
        elif isinstance(mask, DecodeKeyMask):
            o_BNTH = split_kv_decode_attention(q_BNTH, k_BKTH, v_BKTH, mask)
        elif isinstance(mask, Tensor):
            o_BNTH = _masked_sdpa(q_BNTH, k_BKTH, v_BKTH, mask) if gqa else F.scaled_dot_product_attention(
                q_BNTH, k_BKTH, v_BKTH, attn_mask=mask
            )
        else:
            o_BNTH = _flex_attention(q_BNTH, k_BKTH, v_BKTH, mask)
        return self.o_proj(o_BNTH.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)
        # Generation only (`ft.generation.fused_projections`): gate and up weights
        # concatenated, one matmul for both. Not in the state dict; None otherwise.
        self.register_buffer("gate_up_weight", None, persistent=False)

    def forward(self, x_BTD: Tensor) -> Tensor:
        if self.gate_up_weight is not None:
            gate_BTF, up_BTF = F.linear(x_BTD, self.gate_up_weight).chunk(2, dim=-1)
        else:
            gate_BTF, up_BTF = self.gate_proj(x_BTD), self.up_proj(x_BTD)
        return self.down_proj(F.silu(gate_BTF) * up_BTF)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, h_BTD: Tensor, cos_BTH: Tensor, sin_BTH: Tensor, mask: AttentionMask, kv_cache: KVCache | None) -> Tensor:
        h_BTD = h_BTD + self.self_attn(self.input_layernorm(h_BTD), cos_BTH, sin_BTH, mask, kv_cache)
        return h_BTD + self.mlp(self.post_attention_layernorm(h_BTD))


class LlamaModel(nn.Module):
    """The decoder stack without the output projection (HF's `model.` prefix)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(
        self,
        tokens_BT: Tensor,
        *,
        positions_BT: Tensor | None = None,
        document_ids_BT: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        B, T = tokens_BT.shape
        if positions_BT is None:
            if kv_cache is not None:
                raise ValueError("decoding with a kv_cache needs explicit positions_BT")
            positions_BT = torch.arange(T, device=tokens_BT.device).expand(B, T)
        h_BTD = tied_embedding.embedding(self.embed_tokens, tokens_BT)
        cos_BTH, sin_BTH = self.rotary_emb(positions_BT, h_BTD.dtype)
        if kv_cache is not None:
            if document_ids_BT is not None:
                raise ValueError("document_ids_BT and kv_cache cannot be combined")
            mask = kv_cache.attention_mask(T)
        elif document_ids_BT is not None:
            mask = document_causal_mask(document_ids_BT)
        else:
            mask = None
        for layer in self.layers:
            h_BTD = layer(h_BTD, cos_BTH, sin_BTH, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm(h_BTD)


def document_causal_mask(document_ids_BT: Tensor, *, use_flex: bool | None = None) -> AttentionMask:
    """A token attends to earlier tokens of its own document (padding: its own id, -1).

    Every query sees at least itself, so no row is fully masked. On CUDA a FlexAttention
    block mask skips the blocks between documents; elsewhere a boolean [B, 1, T, T] mask.
    """
    B, T = document_ids_BT.shape
    if use_flex is None:
        use_flex = document_ids_BT.is_cuda
    if use_flex:
        from torch.nn.attention.flex_attention import create_block_mask

        docs_BT = document_ids_BT

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (docs_BT[b, q_idx] == docs_BT[b, kv_idx])

        return create_block_mask(mask_mod, B, None, T, T, device=document_ids_BT.device)
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=document_ids_BT.device).tril()
    same_doc_BTT = document_ids_BT[:, :, None] == document_ids_BT[:, None, :]
    return (same_doc_BTT & causal_TT)[:, None]


class Llama(nn.Module):
    """A Llama causal LM with HF `LlamaForCausalLM` parameter names.

    `logits_BTV = model(tokens_BT)`; see `LlamaModel.forward` for packed rows
    (`positions_BT`, `document_ids_BT`) and decoding (`kv_cache`). With
    `return_hidden=True` the final-norm hidden states [B, T, D] come back instead of
    logits, so a trainer can compute a chunked cross-entropy through `model.lm_head`.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share embed_tokens.weight as lm_head.weight when the config ties them."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> "Llama":
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()  # to_empty may give each module its own copy of a shared parameter
        return self

    def forward(
        self,
        tokens_BT: Tensor,
        *,
        positions_BT: Tensor | None = None,
        document_ids_BT: Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        h_BTD = self.model(tokens_BT, positions_BT=positions_BT, document_ids_BT=document_ids_BT, kv_cache=kv_cache)
        if return_hidden:
            return h_BTD
        return self.lm_head(h_BTD)

    def reset_buffers(self) -> None:
        """Recompute the non-persistent RoPE table (after `to_empty`)."""
        self.model.rotary_emb.reset_buffers()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """HF's init: normal(0, init_std) for linear and embedding weights, ones for norms."""
        with torch.random.fork_rng(devices=_cuda_devices(self)):
            if seed is not None:
                torch.manual_seed(seed)
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    if module is self.lm_head and self.config.tie_embeddings:
                        continue
                    nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, RMSNorm):
                    module.reset_parameters()


def _cuda_devices(module: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})


def num_parameters(config: LlamaConfig, *, include_embeddings: bool = True) -> int:
    """Parameter count of `Llama(config)` (tied weights counted once)."""
    c = config
    attn = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    if c.attention_bias:
        attn += c.head_dim * (c.n_heads + 2 * c.n_kv_heads)
    if c.qk_norm:
        attn += 2 * c.head_dim
    per_layer = attn + 3 * c.dim * c.ffn_dim + 2 * c.dim
    n = c.n_layers * per_layer + c.dim
    if include_embeddings:
        n += c.vocab_size * c.dim * (1 if c.tie_embeddings else 2)
    return n


__all__ = [
    "AttentionMask", "LLAMA_ARCHS", "Llama", "LlamaConfig", "LlamaModel", "LlamaRopeScaling",
    "apply_rope", "check_config_keys", "document_causal_mask", "get_llama_arch", "num_parameters", "register_llama_arch",
    "rope_inv_freq", "update_llama_config",
]
