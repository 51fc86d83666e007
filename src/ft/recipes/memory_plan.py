"""An instruction-tuning config as the memory model and the automatic plan see it: its
`MemoryPlan`, and the model's source (the arch of a card whose checkpoint is absent).
Shared by `--dry-run` (`ft.recipes.sft_plan`) and `parallel_plan=auto` (`ft.parallel_plan`).
"""

from __future__ import annotations

from typing import Any

from ft.training.memory_model import MemoryPlan


def memory_plan(config: Any, model_config: Any, *, dp_size: int, tp_size: int) -> MemoryPlan:
    """The memory model's view of an instruction-tuning config."""
    lora = config.lora if config.lora.enabled else None
    dtype = config.dtype if config.dtype != "auto" else "bfloat16"  # auto: bfloat16 on a GPU
    return MemoryPlan(
        model_config=model_config, dtype=dtype, mixed_precision=config.mixed_precision, optimizer=config.optimizer,
        optimizer_in_backward=config.optimizer_in_backward, optimizer_cpu_offload=config.optimizer_cpu_offload,
        stochastic_rounding=config.bf16_stochastic_rounding, activation_checkpointing=config.activation_checkpointing,
        activation_checkpointing_blocks=config.activation_checkpointing_blocks,
        activation_offloading=config.activation_offloading, max_num_tokens=config.max_num_tokens,
        loss_chunk_size=config.loss_chunk_size, dp_size=dp_size, tp_size=tp_size,
        data_parallelism=config.data_parallelism, fsdp_reshard_after_forward=config.fsdp_reshard_after_forward,
        lora_rank=lora.rank if lora is not None else None,
        lora_nf4=lora is not None and lora.base_quantization == "nf4",
        lora_fp8=lora is not None and config.fp8 != "none",
        lora_embeddings_on_host=lora is not None and lora.embeddings_on_host,
        compiled=config.torch_compile is not False,  # auto compiles on CUDA, where the plan is for
    )


def planning_model_source(config: Any):
    """The model's source; a card whose checkpoint is not on this machine still gives its arch."""
    from ft.assets import load_card
    from ft.errors import AssetError
    from ft.models import ModelSource
    from ft.models.build import model_config_from_card
    from ft.recipes.lm_setup import resolve_model_source

    try:
        return resolve_model_source(config.model, checkpoint_dir=config.resume_checkpoint_dir)
    except AssetError:
        card = load_card(config.model)
        model_config = model_config_from_card(card)
        if model_config is None:
            raise
        return ModelSource(f"card {card.name!r} (arch only: its checkpoint is not on this machine)", model_config,
                           None, card_name=card.name)
