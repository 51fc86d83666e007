"""The plan of an instruction-tuning run without running it: `--dry-run`, and the
predicted peak memory the recipe logs beside the measured one.

`dry_run_instruction_finetune(config)` builds nothing on a GPU (the model's shapes
come from a meta-device build) and reads only the training split's lengths. It
prints parameters (trainable / total), tokens per step and per epoch, steps per
epoch, the predicted peak memory per GPU by component (`ft.training.memory_model`)
and, with `max_memory_gib` or a visible GPU, whether it fits and the cheapest
change that would make it fit.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ft.recipes.memory_plan import memory_plan, planning_model_source
from ft.training.memory_model import GIB, cheapest_fix, parameter_shapes, predict_memory


def predicted_peak_gib(config: Any, model_config: Any, *, dp_size: int, tp_size: int) -> float:
    plan = memory_plan(config, model_config, dp_size=dp_size, tp_size=tp_size)
    return round(predict_memory(plan).peak / GIB, 2)


def _checkpointing_summary(config: Any, model_config: Any) -> str:
    """activation_checkpointing and which blocks it covers, as `--dry-run` prints it."""
    mode, blocks, n_layers = config.activation_checkpointing, config.activation_checkpointing_blocks, model_config.n_layers
    if mode == "none":
        return "none"
    if blocks is None:
        return f"{mode} on all {n_layers} blocks"
    return (f"{mode} on the first {blocks} of {n_layers} blocks (activation_checkpointing_blocks={blocks}; "
            f"the other {n_layers - blocks} keep all their activations)")


def _gpu_memory_bytes() -> float | None:
    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.get_device_properties(0).total_memory)


def dry_run_instruction_finetune(config: Any) -> int:
    from ft.data import read_examples
    from ft.gang import detect_launch
    from ft.recipes.lm_setup import resolve_tokenizer

    config.check()
    from ft.parallel_plan import plan_parallelism

    config = plan_parallelism(config)  # parallel_plan=auto: prints the chosen layout
    launch = detect_launch()
    world = launch.world_size
    tp = config.tensor_parallel_size
    dp = max(1, world // (tp * config.pipeline_parallel_size))
    source = planning_model_source(config)
    from ft.models.parallelize import check_checkpointed_blocks

    check_checkpointed_blocks(config.activation_checkpointing_blocks, activation_checkpointing=config.activation_checkpointing,
                              n_layers=source.config.n_layers)
    tokenizer = resolve_tokenizer(config.tokenizer, source)
    examples = read_examples(
        config.dataset, tokenizer, split=config.train_split,
        format=None if config.dataset_format == "auto" else config.dataset_format, max_seq_len=config.max_seq_len,
        on_too_long=config.example_too_long, skip_malformed=config.skip_malformed_lines,
    )
    lengths = [len(example.tokens) for example in examples]
    epoch_tokens = sum(lengths)
    step_tokens = config.max_num_tokens * config.gradient_accumulation * dp
    # Packed rows fill up to max_seq_len; unpacked rows pad each example to its batch's longest.
    fill = 1.0 if config.packing else (sum(lengths) / max(1, len(lengths))) / max(1, max(lengths, default=1))
    steps_per_epoch = math.ceil(epoch_tokens / max(1.0, step_tokens * fill))

    shapes = parameter_shapes(source.config)
    plan = memory_plan(config, source.config, dp_size=dp, tp_size=tp)
    estimate = predict_memory(plan, shapes)
    lines = [
        f"model: {source.description}",
        f"parameters: {estimate.params_trainable:,} trainable of {estimate.params_total:,}",
        f"layout: {world} process(es), dp={dp} ({config.data_parallelism}), tp={tp}, pp={config.pipeline_parallel_size}",
        f"activation checkpointing: {_checkpointing_summary(config, source.config)}",
        f"data: {len(lengths):,} examples, {epoch_tokens:,} tokens per epoch (longest {max(lengths, default=0)}, "
        f"mean {epoch_tokens / max(1, len(lengths)):.0f})",
        f"tokens per step: {step_tokens:,} (max_num_tokens {config.max_num_tokens} x gradient_accumulation "
        f"{config.gradient_accumulation} x dp {dp})",
        f"steps per epoch: ~{steps_per_epoch:,}; max_num_steps {config.max_num_steps} is "
        f"~{config.max_num_steps / max(1, steps_per_epoch):.2f} epochs",
        "predicted peak memory per GPU (GiB):",
    ]
    for name, gib in estimate.components_gib().items():
        lines.append(f"  {name:<18} {gib:8.2f}")
    lines.append(f"  {'peak allocated':<18} {estimate.peak / GIB:8.2f}  (weights + states + the largest of "
                 f"activations + loss chunk, activations + recompute (+ NF4 dequantization for QLoRA), "
                 f"gradients + step transient)")
    lines.append(f"  {'with slack':<18} {estimate.peak_with_slack / GIB:8.2f}")
    budget = config.max_memory_gib * GIB if config.max_memory_gib is not None else _gpu_memory_bytes()
    if budget is None:
        lines.append("fits: unknown (no GPU visible; set max_memory_gib to check against a budget)")
    elif estimate.peak_with_slack <= budget:
        lines.append(f"fits: yes, {estimate.peak_with_slack / GIB:.2f} GiB of {budget / GIB:.2f} GiB")
    else:
        lines.append(f"fits: no, {estimate.peak_with_slack / GIB:.2f} GiB needed, {budget / GIB:.2f} GiB available")
        fix = cheapest_fix(plan, budget, shapes)
        if fix is None:
            lines.append("  no single setting change found that fits; use more GPUs (FSDP shards weights, gradients "
                         "and states) or LoRA")
        else:
            label, fixed = fix
            lines.append(f"  cheapest change that fits: {label} -> {fixed.peak_with_slack / GIB:.2f} GiB")
    print("\n".join(lines))
    return 0
