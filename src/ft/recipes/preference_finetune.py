"""`ft lm preference_finetune`: DPO, SimPO, ORPO or CPO on preference pairs.

The loop of `ft lm instruction_finetune` with a pair loss (`ft.preference`): per
optimizer step each data-parallel rank reads its `gradient_accumulation`
micro-batches of pairs; the loss is summed over pairs and divided by the pairs of
the whole step on all ranks. DPO's reference log-probabilities come from one
no-grad pass of the starting model over the train split before the first step,
stored in OUT/reference (resumable), so no second model is kept in memory; under
LoRA that starting model is the base (the adapters start at zero). Checkpoints,
exports, resume and SIGTERM behave as for SFT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import torch

from ft.errors import EXIT_OK, EXIT_STOPPED, ConfigError
from ft.gang import Gangs, setup_gangs
from ft.lora.training import start_lora, with_lora
from ft.models import create_model, model_flops_per_token
from ft.models.parallelize import parallelize_model
from ft.preference.data import PairPlanner, iter_pair_batches, pair_reader, read_pairs
from ft.preference.reference import compute_reference, load_reference, reference_fingerprint
from ft.preference.step import (
    PreferenceStats, accumulate_pair_gradients, preference_loss, publish_preference_stats, validate_pairs,
)
from ft.recipes.checkpoint_saving import checkpoint_saver
from ft.recipes.lm_setup import (
    open_checkpoints, open_metric_recorders, pad_id, resolve_dtype,
    resolve_model_and_tokenizer, setup_run_logging, start_trainer_state,
)
from ft.recipes.preference_finetune_config import PreferenceFinetuneConfig
from ft.training.metrics import device_peak_tflops, format_metrics
from ft.training.nonfinite import NonFiniteGuard
from ft.training.optim import build_optimizer
from ft.training.progress import TrainingProgress
from ft.training.step import optimizer_step
from ft.training.stop_signal import StopSignal

log = logging.getLogger("ft")


def run_preference_finetune(config: PreferenceFinetuneConfig, output_dir: Path) -> int:
    config.check()
    gangs = setup_gangs(
        device=config.device, tensor_parallel_size=config.tensor_parallel_size, replicas=config.fsdp_replicas
    )
    with gangs:
        setup_run_logging(output_dir, gangs.root.rank)
        return train(config, output_dir, gangs)


def train(config: PreferenceFinetuneConfig, output_dir: Path, gangs: Gangs) -> int:
    device = gangs.device
    dtype = resolve_dtype(config.dtype, device)
    source, tokenizer, lora = resolve_model_and_tokenizer(config, gangs)

    def read(split: str):
        pairs = read_pairs(config.dataset, tokenizer, split=split, max_seq_len=config.max_seq_len,
                           on_too_long=config.example_too_long, skip_malformed=config.skip_malformed_lines)
        log.info("%s data (%s): %s", split, pairs.description, pairs.stats.summary())
        return pairs

    def planner(pairs):
        return PairPlanner(pairs, max_seq_len=config.max_seq_len, max_num_tokens=config.max_num_tokens,
                           packing=config.packing, pad_id=pad_id(tokenizer))

    train_pairs = read(config.train_split)
    valid_pairs = read(config.valid_split) if config.validate_every_n_steps is not None else None
    reader = pair_reader(
        train_pairs, max_seq_len=config.max_seq_len, max_num_tokens=config.max_num_tokens, seed=config.seed,
        packing=config.packing, max_num_data_epochs=config.max_num_data_epochs, dp_size=gangs.dp.size,
        dp_rank=gangs.dp.rank, gradient_accumulation=config.gradient_accumulation, pad_id=pad_id(tokenizer),
    )

    if config.save_model_only:
        log.warning("save_model_only: checkpoints hold only the model, no trainer state; this run cannot be resumed")
    checkpoints, resume_step = open_checkpoints(config, output_dir, gangs, lora=lora,
                                                background=config.checkpoint_in_background,
                                                single_process=gangs.root.size == 1)
    mixed = config.mixed_precision and dtype != torch.float32
    torch.manual_seed(config.seed)

    def parallelize(model):
        return parallelize_model(
            model, gangs, data_parallelism=config.data_parallelism,
            activation_checkpointing=config.activation_checkpointing,
            activation_checkpointing_blocks=config.activation_checkpointing_blocks, compile=config.torch_compile,
            reshard_after_forward=config.fsdp_reshard_after_forward, param_dtype=dtype if mixed else None,
            reduce_dtype=torch.float32,
        )

    model = create_model(
        source.config, device=device, dtype=torch.float32 if mixed else dtype,
        parallelize=with_lora(parallelize, lora, base_dtype=dtype, adapter_dtype=torch.float32 if mixed else dtype)
        if lora is not None else parallelize,
        checkpoint=source.checkpoint if resume_step is None or lora is not None else None, seed=config.seed,
        initialize=resume_step is None,
    )
    if lora is not None:
        start_lora(model, lora, seed=config.seed, resuming=resume_step is not None, dtype=dtype)
    fsdp = gangs.dp.size > 1 and config.data_parallelism == "fsdp"
    autocast = torch.autocast(device.type, dtype=dtype) if mixed and not fsdp else contextlib.nullcontext()

    with StopSignal() as stop:
        reference_P2 = None
        if config.criterion.needs_reference:
            fingerprint = reference_fingerprint(train_pairs, model=source.description, dtype=str(dtype),
                                                mixed_precision=mixed, lora=lora is not None)
            if resume_step is not None:  # the weights are already trained: only the stored table will do
                stored = load_reference(output_dir / "reference", fingerprint)
                if stored is None or not stored[2]:
                    raise ConfigError(f"{output_dir / 'reference'} has no complete reference log-probs, but "
                                      f"{checkpoints.dir} holds trained steps; use a new OUT")
                reference_P2 = stored[0]
            else:
                reference_P2 = compute_reference(
                    model, train_pairs, directory=output_dir / "reference", fingerprint=fingerprint, gangs=gangs,
                    autocast=autocast, planner=planner(train_pairs), chunk_size=config.loss_chunk_size,
                    save_every=config.reference_save_every_n_rounds, stop=lambda: stop.requested(gangs),
                )
                if reference_P2 is None:
                    return EXIT_STOPPED
        return _train_loop(config, output_dir, gangs, model=model, source=source, tokenizer=tokenizer, lora=lora,
                           reader=reader, valid_pairs=valid_pairs, planner=planner, checkpoints=checkpoints,
                           resume_step=resume_step, dtype=dtype, autocast=autocast, reference_P2=reference_P2,
                           stop=stop)


def _train_loop(config: PreferenceFinetuneConfig, output_dir: Path, gangs: Gangs, *, model, source, tokenizer, lora,
                reader, valid_pairs, planner, checkpoints, resume_step, dtype, autocast, reference_P2, stop) -> int:
    device = gangs.device
    optimizer = build_optimizer(
        model, learning_rate=config.learning_rate, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
    scheduler, state, model_config_dict = start_trainer_state(
        config, model=model, optimizer=optimizer, reader=reader, source=source, lora=lora, checkpoints=checkpoints,
        resume_step=resume_step, dtype=dtype, device=device,
    )

    nonfinite = NonFiniteGuard(config.nonfinite_policy, gangs=gangs, check_grad_norm=not state.scaler.is_enabled(),
                               start_step=state.step)
    saved_step = state.step if resume_step is not None else None

    def check_finite() -> None:
        newest = checkpoints.dir / f"step_{saved_step}" if saved_step is not None else None
        nonfinite.check(state.step, newest_checkpoint=newest and str(newest), learning_rate=config.learning_rate)

    save = checkpoint_saver(config, checkpoints=checkpoints, model=model, optimizer=optimizer, state=state,
                            model_config=model_config_dict, gangs=gangs, tokenizer=tokenizer, source=source, lora=lora)

    def save_checkpoint() -> None:
        check_finite()  # never save a non-finite state: the newest checkpoint stays the last good one
        save()

    recorders = open_metric_recorders(config, output_dir, gangs, start_step=state.step)
    peak_tflops, peak_source = device_peak_tflops(device, config.peak_tflops)
    flops_per_token = model_flops_per_token(source.config, config.max_seq_len)
    log.info("model: %s, %s params, criterion: %s, MFU peak: %s", source.description,
             f"{sum(p.numel() for p in model.parameters()):,}", config.criterion.name, peak_source)
    loss_fn = preference_loss(config.criterion, chunk_size=config.loss_chunk_size, reference_P2=reference_P2)
    valid_loss_fn = None
    if valid_pairs is not None:  # validation pairs have no reference pass: DPO validates reference-free
        valid_loss_fn = preference_loss(dataclasses.replace(
            config.criterion, dpo=dataclasses.replace(config.criterion.dpo, reference_free=True)),
            chunk_size=config.loss_chunk_size, reference_P2=None)
    stats = PreferenceStats.zero(device)
    progress = TrainingProgress(total=config.max_num_steps, start=state.step, enabled=gangs.is_main)
    stopped = False
    first_step = state.step + 1
    model.train()
    with progress:
        while state.step < config.max_num_steps:
            batches = reader.next_step_batches()
            if batches is None:
                log.info("data exhausted after %d epochs", config.max_num_data_epochs)
                break
            nonfinite.begin_step(stats)
            step_loss = accumulate_pair_gradients(model, batches, gangs=gangs, autocast=autocast,
                                                  scaler=state.scaler, loss_fn=loss_fn, stats=stats)
            lr = optimizer.param_groups[0]["lr"]
            grad_norm = optimizer_step(model, optimizer, scheduler, state.scaler, max_grad_norm=config.max_grad_norm,
                                       skip_if=nonfinite.skip_if(step_loss, state.step + 1))
            nonfinite.end_step(stats, step_loss, grad_norm)
            state.step += 1
            step = state.step
            if step == first_step:  # the optimizer has its state now
                checkpoints.prepare(model, optimizer, model_only=config.save_model_only)
            stats.steps += 1
            progress.advance(step)
            if step % config.publish_metrics_every_n_steps == 0 or step == config.max_num_steps:
                stats.grad_norm = float(grad_norm)
                values = publish_preference_stats(stats, gangs, lr=lr, peak_tflops=peak_tflops,
                                                  flops_per_token=flops_per_token, epoch=reader.epoch)
                if recorders is not None:
                    recorders.record("train", step, values)
                    progress.log(f"step {step} " + format_metrics(values))
                stats = PreferenceStats.zero(device)
                check_finite()
            if valid_pairs is not None and step % config.validate_every_n_steps == 0:
                batches = iter_pair_batches(valid_pairs, max_seq_len=config.max_seq_len,
                                            max_num_tokens=config.max_num_tokens, packing=config.packing,
                                            dp_size=gangs.dp.size, dp_rank=gangs.dp.rank, pad_id=pad_id(tokenizer))
                values = validate_pairs(model, batches, gangs=gangs, autocast=autocast, loss_fn=valid_loss_fn)
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
