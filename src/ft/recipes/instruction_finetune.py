"""`ft lm instruction_finetune`: supervised fine-tuning of a causal LM.

One explicit loop. Per optimizer step each data-parallel rank reads its
`gradient_accumulation` micro-batches; the loss is summed over target tokens and
divided by the target tokens of the whole step over all data-parallel ranks, so
dp=N gives the update one process gets with gradient_accumulation=N. Checkpoints
(OUT/checkpoints/step_N) hold the sharded trainer state and an HF-layout model;
re-running the same OUT resumes; SIGTERM/SIGINT finish the step, save and exit.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from ft.errors import EXIT_OK, EXIT_STOPPED
from ft.gang import Gangs, setup_gangs
from ft.lora.training import adapter_to_start_from, start_lora, with_lora
from ft.models import create_model, model_flops_per_token
from ft.models.async_tp import check_async_tp
from ft.models.fp8 import check_fp8_support
from ft.models.parallelize import parallelize_model
from ft.models.pipeline import check_pipeline_layout, with_pipeline
from ft.parallel_plan import plan_parallelism
from ft.recipes.checkpoint_saving import checkpoint_saver
from ft.recipes.instruction_finetune_config import InstructionFinetuneConfig, optimizer_settings
from ft.recipes.sft_plan import predicted_peak_gib
from ft.recipes.lm_setup import (
    open_checkpoints, open_metric_recorders, pad_id, read_sft_data, resolve_dtype,
    resolve_model_and_tokenizer, setup_run_logging, start_trainer_state, sft_validation_batches,
)
from ft.training.compile_choice import resolve_compile
from ft.training.metrics import device_peak_tflops, format_metrics
from ft.training.nonfinite import NonFiniteGuard
from ft.training.activation_offloading import offloading_loss_fn
from ft.training.optimizers import build_optimizer, step_in_backward
from ft.training.progress import TrainingProgress
from ft.training.optim import clip_grad_norm
from ft.training.pipeline_step import PipelineRunner
from ft.training.step import accumulate_gradients, next_token_loss, optimizer_step, validate
from ft.training.step_stats import StepStats, publish_stats
from ft.training.stop_signal import StopSignal

log = logging.getLogger("ft")

# Steps after (re)start that compile and allocate: published as warm-up, not throughput.
WARMUP_STEPS = 2


def run_instruction_finetune(config: InstructionFinetuneConfig, output_dir: Path) -> int:
    config.check()
    config = plan_parallelism(config)  # parallel_plan=auto fills in the layout
    gangs = setup_gangs(
        device=config.device, tensor_parallel_size=config.tensor_parallel_size, replicas=config.fsdp_replicas,
        pipeline_parallel_size=config.pipeline_parallel_size,
    )
    with gangs:  # tears the process group down, waiting for all ranks on success
        setup_run_logging(output_dir, gangs.root.rank)
        return train(config, output_dir, gangs)


def train(config: InstructionFinetuneConfig, output_dir: Path, gangs: Gangs) -> int:
    device = gangs.device
    dtype = resolve_dtype(config.dtype, device)
    source, tokenizer, lora = resolve_model_and_tokenizer(config, gangs)
    check_pipeline_layout(source.config, pipeline_parallel_size=config.pipeline_parallel_size,
                          schedule=config.pipeline_schedule, micro_batches=config.gradient_accumulation)
    start_adapter = adapter_to_start_from(lora, source)  # model= names a LoRA run's step
    check_fp8_support(config.fp8, device, lora=lora is not None, dtype=dtype)
    reader, valid_examples = read_sft_data(config, tokenizer, gangs)

    if config.save_model_only:
        log.warning("save_model_only: checkpoints hold only the model, no trainer state; this run cannot be resumed")
    checkpoints, resume_step = open_checkpoints(config, output_dir, gangs, lora=lora,
                                                background=config.checkpoint_in_background,
                                                single_process=gangs.root.size == 1)
    # Mixed precision keeps float32 master weights and computes in `dtype`.
    mixed = config.mixed_precision and dtype != torch.float32
    torch.manual_seed(config.seed)
    if resume_step is None:
        log.info("weights: %s", source.description if source.checkpoint is not None
                 else f"random initialisation (seed {config.seed}), {source.description} has no checkpoint")
    compile_blocks = resolve_compile(config.torch_compile, device.type)
    check_async_tp(enabled=config.async_tensor_parallel, device_type=device.type, compiled=compile_blocks,
                   tp_size=gangs.tp.size, sequence_parallel=config.sequence_parallel)

    def parallelize(model):
        return parallelize_model(
            model, gangs, data_parallelism=config.data_parallelism,
            activation_checkpointing=config.activation_checkpointing,
            activation_checkpointing_blocks=config.activation_checkpointing_blocks, compile=compile_blocks,
            reshard_after_forward=config.fsdp_reshard_after_forward, param_dtype=dtype if mixed else None,
            reduce_dtype=torch.float32, fp8=config.fp8 if lora is None else "none",  # LoRA: start_lora casts
            sequence_parallel=config.sequence_parallel,
            async_tp=config.async_tensor_parallel,
        )

    parallelize = with_pipeline(parallelize, pp_rank=gangs.pp.rank, pp_size=gangs.pp.size,
                                schedule=config.pipeline_schedule)

    model = create_model(
        source.config, device=device, dtype=torch.float32 if mixed else dtype,
        parallelize=with_lora(parallelize, lora, base_dtype=dtype, adapter_dtype=torch.float32 if mixed else dtype)
        if lora is not None else parallelize,
        # A LoRA run's trainer state holds only the adapters: the base always comes from its checkpoint.
        checkpoint=source.checkpoint if resume_step is None or lora is not None else None, seed=config.seed,
        initialize=resume_step is None,
    )
    if lora is not None:
        start_lora(model, lora, seed=config.seed, resuming=resume_step is not None, dtype=dtype,
                   adapter=start_adapter, adapter_source=source.adapter, fp8=config.fp8)
    optimizer = build_optimizer(model, optimizer_settings(config), dp_size=gangs.dp.size)
    scheduler, state, model_config_dict = start_trainer_state(
        config, model=model, optimizer=optimizer, reader=reader, source=source, lora=lora, checkpoints=checkpoints,
        resume_step=resume_step, dtype=dtype, device=device,
    )

    nonfinite = NonFiniteGuard(config.nonfinite_policy, gangs=gangs, check_grad_norm=not state.scaler.is_enabled(),
                               start_step=state.step)

    def check_finite() -> None:
        newest = checkpoints.dir / f"step_{saved_step}" if saved_step is not None else None
        nonfinite.check(state.step, newest_checkpoint=newest and str(newest), learning_rate=config.learning_rate)

    recorders = open_metric_recorders(config, output_dir, gangs, start_step=state.step)
    peak_tflops, peak_source = device_peak_tflops(device, config.peak_tflops)
    flops_per_token = model_flops_per_token(source.config, config.max_seq_len)
    log.info("model: %s, %s params, MFU peak: %s", source.description,
             f"{sum(p.numel() for p in model.parameters()):,}", peak_source)
    # FSDP casts parameters itself (MixedPrecisionPolicy); one process and DDP need autocast.
    fsdp = gangs.dp.size > 1 and config.data_parallelism == "fsdp"
    autocast = torch.autocast(device.type, dtype=dtype) if mixed and not fsdp else contextlib.nullcontext()
    loss_fn = offloading_loss_fn(next_token_loss(config.loss_chunk_size), enabled=config.activation_offloading,
                                 device=device)
    # Pipeline stages: the schedule runs the step's micro-batches, the grad norm spans every stage.
    runner = PipelineRunner(model, gangs, schedule=config.pipeline_schedule, micro_batches=config.gradient_accumulation,
                            loss_chunk_size=config.loss_chunk_size, scaler=state.scaler) if gangs.pp.size > 1 else None
    save = checkpoint_saver(config, checkpoints=checkpoints, model=model, optimizer=optimizer, state=state,
                            model_config=model_config_dict, gangs=gangs, tokenizer=tokenizer, source=source, lora=lora,
                            runner=runner)

    def save_checkpoint() -> None:
        check_finite()  # never save a non-finite state: the newest checkpoint stays the last good one
        save()

    # The memory model's figure beside the measured peak in the first metrics line, so its error shows.
    predicted = {"predicted_peak_memory_gib": predicted_peak_gib(config, source.config, dp_size=gangs.dp.size,
                                                                 tp_size=gangs.tp.size)}
    stats = StepStats.zero(device, warmup_steps=WARMUP_STEPS)
    saved_step = state.step if resume_step is not None else None
    progress = TrainingProgress(total=config.max_num_steps, start=state.step, enabled=gangs.is_main)
    stopped = False
    first_step = state.step + 1
    model.train()
    with progress, StopSignal() as stop:
        while state.step < config.max_num_steps:
            batches = reader.next_step_batches()
            if batches is None:
                log.info("data exhausted after %d epochs", config.max_num_data_epochs)
                break
            nonfinite.begin_step(stats)
            if runner is not None:
                step_loss = runner.step(batches, autocast=autocast, stats=stats)
            else:
                step_loss = accumulate_gradients(model, batches, gangs=gangs, autocast=autocast, scaler=state.scaler,
                                                 loss_fn=loss_fn, stats=stats)
            lr = optimizer.param_groups[0]["lr"]
            if config.optimizer_in_backward:  # parameters were stepped as their gradients arrived
                grad_norm = step_in_backward(optimizer, scheduler)
            else:
                grad_norm = optimizer_step(model, optimizer, scheduler, state.scaler,
                                           max_grad_norm=config.max_grad_norm,
                                           skip_if=nonfinite.skip_if(step_loss, state.step + 1),
                                           clip=runner.clip_grad_norm if runner is not None else clip_grad_norm)
            nonfinite.end_step(stats, step_loss, grad_norm)
            state.step += 1
            step = state.step
            if step == first_step:  # the optimizer has its state now
                checkpoints.prepare(model, optimizer, model_only=config.save_model_only)
            stats.finish_step()
            progress.advance(step)
            if step % config.publish_metrics_every_n_steps == 0 or step == config.max_num_steps:
                stats.grad_norm = float(grad_norm)
                values = publish_stats(stats, gangs, lr=lr, peak_tflops=peak_tflops, flops_per_token=flops_per_token,
                                       epoch=reader.epoch) | predicted
                predicted = {}
                if recorders is not None:
                    recorders.record("train", step, values)
                    progress.log(f"step {step} " + format_metrics(values))
                stats = StepStats.zero(device)
                check_finite()
            if valid_examples is not None and step % config.validate_every_n_steps == 0:
                valid_batches = sft_validation_batches(config, valid_examples, gangs, pad_id(tokenizer))
                values = runner.validate(valid_batches, autocast=autocast) if runner is not None else \
                    validate(model, valid_batches, gangs=gangs, autocast=autocast, loss_fn=loss_fn)
                if recorders is not None:
                    recorders.record("valid", step, values)
                    progress.log(f"valid step {step} " + format_metrics(values))
            stopping = stop.requested(gangs)
            if step % config.checkpoint_every_n_steps == 0 or stopping:
                save_checkpoint()
                saved_step = step
            if stopping:
                stopped = True
                log.warning("stopped by signal at step %d; %s", step, "model saved (save_model_only: no resume)"
                            if config.save_model_only else "checkpoint saved, re-run the same command to resume")
                break
    if saved_step != state.step:
        save_checkpoint()
    checkpoints.close()  # the last save is complete before the run ends
    if recorders is not None:
        recorders.close()
    return EXIT_STOPPED if stopped else EXIT_OK
