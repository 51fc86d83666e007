"""What a training recipe calls to run LoRA: wrap its parallelize step, give the
adapters their start values (or quantize the base), and export at checkpoints.

A LoRA run's trainer state holds only the trainable tensors and their optimizer
state (`CheckpointManager(trainable_only=True)`); the frozen base is read from the
base checkpoint again on resume, so a LoRA run always needs one. A checkpoint's
step directory holds the adapter in the PEFT format (`adapter_config.json`,
`adapter_model.safetensors`) and, with `export_merged`, the merged model in
`merged/` (a separate directory: transformers would read a directory holding an
`adapter_config.json` as an adapter and go looking for its base).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ft.errors import ConfigError
from ft.lora.apply import apply_lora, init_lora_weights, lora_state_dict
from ft.lora.config import LoraConfig, check_float8_base_layout
from ft.lora.merge import iter_checkpoint_tensors, merge_tensors
from ft.lora.peft_io import save_adapter

log = logging.getLogger("ft")

MERGED_SUBDIR = "merged"


def check_lora_run(config: LoraConfig, *, source: Any, dp_size: int, tp_size: int, pp_size: int = 1,
                   data_parallelism: str = "fsdp", fsdp_replicas: int = 1, fp8: str = "none") -> None:
    """ConfigError for a LoRA run that cannot work with this model and layout."""
    if fp8 != "none":
        check_float8_base_layout(config, fp8, dp_size=dp_size, tp_size=tp_size, pp_size=pp_size)
    if source.checkpoint is None:
        raise ConfigError(f"LoRA trains adapters on a base with weights, but {source.description} has no checkpoint; "
                          "use a model card or path with weights, or lora.enabled=false")
    if config.embeddings_on_host:
        from ft.lora.host_embedding import check_embeddings_on_host

        check_embeddings_on_host(config, model_config=source.config, dp_size=dp_size, tp_size=tp_size,
                                 pp_size=pp_size)
    if config.base_quantization == "nf4":
        from ft.lora.quant import check_nf4_available

        check_nf4_available()
        if tp_size > 1 or pp_size > 1:
            raise ConfigError("lora.base_quantization=nf4 runs on one process or under FSDP2; splitting NF4 "
                              "base weights by tensor parallelism or pipeline stages is not supported: use "
                              "tensor_parallel_size=1 and pipeline_parallel_size=1 with QLoRA")
        if dp_size > 1 and data_parallelism == "ddp":
            # DDP's start-up broadcast of the NF4 parameters leaves the other ranks a slightly different base.
            raise ConfigError("config key 'data_parallelism' (ddp) does not combine with lora.base_quantization=nf4; "
                              "use data_parallelism=fsdp (FSDP2 shards the NF4 base)")
        if fsdp_replicas > 1 and dp_size == fsdp_replicas:
            # FSDP2 gathers nothing for one process per shard group and skips torchao's NF4 all-gather.
            raise ConfigError(f"config key 'fsdp_replicas' ({fsdp_replicas}) leaves one process per FSDP shard group, "
                              "which lora.base_quantization=nf4 does not support; use fewer replicas (at least 2 "
                              "processes per replica)")


def lora_fingerprint(config: LoraConfig) -> dict[str, Any]:
    """What must match between a LoRA run's checkpoint and the run resuming it."""
    return {"rank": config.rank, "alpha": config.alpha, "target_modules": sorted(config.target_modules),
            "train_embeddings": config.train_embeddings, "base_quantization": config.base_quantization}


def with_lora(parallelize: Callable[[nn.Module], nn.Module], config: LoraConfig, *,
              base_dtype: torch.dtype, adapter_dtype: torch.dtype = torch.float32) -> Callable[[nn.Module], nn.Module]:
    """`parallelize` preceded by `apply_lora`, for `create_model(parallelize=...)`. A recipe
    passes `adapter_dtype=float32` under mixed precision (master weights), else its dtype."""
    def apply_then_parallelize(model: nn.Module) -> nn.Module:
        return parallelize(apply_lora(model, config, base_dtype=base_dtype, adapter_dtype=adapter_dtype))

    return apply_then_parallelize


def adapter_to_start_from(config: LoraConfig | None, source: Any) -> dict[str, torch.Tensor] | None:
    """The adapter tensors a run starts from when `model` names a LoRA adapter (a LoRA run's
    step, with its base), else None. Full fine-tuning from an adapter is a ConfigError
    saying what to pass instead."""
    if source.adapter is None:
        return None
    if config is None:
        raise ConfigError(
            f"model {source.adapter} is a LoRA adapter, not a full model: continue training it with "
            "lora.enabled=true (and its lora.rank / lora.alpha / lora.target_modules), or fine-tune all weights "
            f"from its merged model ({source.adapter / MERGED_SUBDIR}, written with lora.export_merged=true)"
        )
    from ft.lora.adapter_model import check_adapter_matches

    return check_adapter_matches(config, source.adapter)


def start_lora(model: nn.Module, config: LoraConfig, *, seed: int, resuming: bool, dtype: torch.dtype,
               adapter: dict[str, torch.Tensor] | None = None, adapter_source: Path | None = None,
               fp8: str = "none") -> None:
    """After the base is loaded: adapters' start values (unless resuming: fresh, or those of
    `adapter`), then NF4 for QLoRA or float8 for `fp8`; logs where the input embedding is with
    `embeddings_on_host`."""
    if not resuming:
        init_lora_weights(model, seed)
        if adapter is not None:
            from ft.lora.adapter_model import load_adapter_weights

            load_adapter_weights(model, adapter, source=adapter_source)
            log.info("adapters start from %s", adapter_source)
    if config.base_quantization == "nf4":
        from ft.lora.layers import quantize_frozen_linears

        count = quantize_frozen_linears(model, dtype=dtype)
        log.info("QLoRA: %d frozen linear weights in NF4", count)
    if fp8 != "none":
        from ft.lora.layers import float8_frozen_linears

        count, kept = float8_frozen_linears(model, fp8, dtype=dtype)
        log.info("fp8=%s: %d frozen linear weights in float8 (forward and input-gradient matmuls in float8)%s",
                 fp8, count, f"; kept in {dtype} (a dimension not a multiple of 16): {', '.join(kept)}" if kept else "")
    if config.embeddings_on_host:
        embedding = model.model.embed_tokens
        table = embedding.weight
        log.info("input embedding table (%.2f GiB) in %s %s memory (%s): ids looked up there, rows sent",
                 table.numel() * table.element_size() / 2**30, "pinned" if table.is_pinned() else "pageable",
                 "host" if table.device.type == "cpu" else table.device.type, type(embedding).__name__)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA rank %d on %s: %s trainable parameters", config.rank, ", ".join(config.target_modules),
             f"{trainable:,}")


def export_lora(model: nn.Module, directory: Path, *, is_main: bool, dtype: torch.dtype, config: LoraConfig,
                source: Any, tokenizer: Any = None,
                gather: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None] | None = None) -> None:
    """Write the adapter (PEFT format) into `directory` and, with `export_merged`, the merged
    model into `directory/merged`, merged onto the base checkpoint's own weights.
    A collective: every rank calls it; rank 0 writes. `gather`: for pipeline stages, which
    each hold their blocks' adapters, merges every stage's on rank 0
    (`ft.training.pipeline_step.gather_from_stages`)."""
    state = lora_state_dict(model, rank0_only=gather is None)
    if gather is not None:
        state = gather(state)
    if not is_main:
        return
    base_name = source.card_name or str(source.checkpoint)
    save_adapter(directory, state, config, dtype=dtype, base_model_name_or_path=base_name)
    if config.export_merged:
        from ft.models.hf_export import save_hf_state_dict

        base = iter_checkpoint_tensors(source.checkpoint, source.config)
        save_hf_state_dict(merge_tensors(base, state, config), source.config, directory / MERGED_SUBDIR,
                           dtype=dtype, tokenizer=tokenizer)
