"""The Llama family bundle: what the rest of ft knows about Llama (see `ft.models.family`)."""

from __future__ import annotations

from typing import Any

from ft.models.family_bundle import ModelFamily
from ft.models.llama.checkpoint import config_from_hf_dict, config_from_meta_params, iter_meta_state_dict
from ft.models.llama.hf import hf_config_dict, hf_generation_config_dict
from ft.models.llama.model import LLAMA_ARCHS, Llama, LlamaConfig, num_parameters, update_llama_config


def llama_tp_plan(loss_parallel: bool = False) -> dict[str, Any]:
    """Module name pattern -> ParallelStyle for tensor parallelism (no sequence parallelism).

    The residual stream stays replicated on every tp rank: the embedding (rows =
    vocabulary sharded) all-reduces its output, each attention / MLP block turns the
    replicated input into sharded heads / ffn columns and back with one all-reduce
    in o_proj / down_proj. `lm_head` is column-wise (vocabulary sharded); its logits
    are all-gathered to a plain replicated tensor, unless `loss_parallel`, where
    they stay a DTensor sharded on the vocabulary (`Shard(-1)`): no rank holds the
    full logits, and the loss (cross_entropy) and its backward must both run under
    `torch.distributed.tensor.parallel.loss_parallel()`.
    Tied embeddings work: both layers shard the [vocab, dim] weight on dim 0.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
        "model.layers.*.self_attn.q_proj": ColwiseParallel(),
        "model.layers.*.self_attn.k_proj": ColwiseParallel(),
        "model.layers.*.self_attn.v_proj": ColwiseParallel(),
        "model.layers.*.self_attn.o_proj": RowwiseParallel(),
        "model.layers.*.mlp.gate_proj": ColwiseParallel(),
        "model.layers.*.mlp.up_proj": ColwiseParallel(),
        "model.layers.*.mlp.down_proj": RowwiseParallel(),
        "lm_head": ColwiseParallel(
            output_layouts=Shard(-1) if loss_parallel else Replicate(), use_local_output=not loss_parallel
        ),
    }


def llama_flops_per_token(config: LlamaConfig, seq_len: int) -> int:
    """Training FLOPs per token (torchtitan's count, forward + backward):
    6 x (non-embedding parameters + the output projection) + 12 x layers x heads x head_dim x seq_len.
    The output projection counts even when tied: its matmul is done all the same."""
    dense = num_parameters(config, include_embeddings=False) + config.vocab_size * config.dim
    return 6 * dense + 12 * config.n_layers * config.n_heads * config.head_dim * seq_len


LLAMA_FAMILY = ModelFamily(
    name="llama",
    config_class=LlamaConfig,
    model_class=Llama,
    archs=LLAMA_ARCHS,
    update_config=update_llama_config,
    hf_model_types=("llama",),
    config_from_hf=config_from_hf_dict,
    hf_config=hf_config_dict,
    hf_generation_config=hf_generation_config_dict,
    tp_plan=llama_tp_plan,
    flops_per_token=llama_flops_per_token,
    num_parameters=num_parameters,
    default_tokenizer_family="llama3",
    chat_template="llama3",
    config_from_meta=config_from_meta_params,
    iter_meta_state_dict=iter_meta_state_dict,
)
