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
import dataclasses
import logging
import signal
import time
from pathlib import Path
from typing import Any

import torch

from ft.config import config_to_dict
from ft.data import BatchReader, iter_validation_batches, read_examples
from ft.errors import ConfigError
from ft.gang import Gangs, setup_gangs
from ft.models import build_model, model_flops_per_token
from ft.models.llama.checkpoint import load_checkpoint
from ft.models.llama.hf import save_hf_state_dict
from ft.models.llama.parallelize import check_parallel_layout, iter_full_state_dict, parallelize_llama
from ft.recipes.cli_support import recipe_command
from ft.recipes.instruction_finetune_config import InstructionFinetuneConfig
from ft.recipes.lm_setup import DTYPES, resolve_dtype, resolve_model_source, resolve_tokenizer, setup_run_logging
from ft.training.checkpoint import CheckpointManager
from ft.training.loss import chunked_cross_entropy_sum, target_positions
from ft.training.metrics import MetricBag, device_peak_tflops, format_metrics
from ft.training.optim import build_optimizer, build_scheduler, clip_grad_norm
from ft.training.progress import TrainingProgress

log = logging.getLogger("ft")


def run_instruction_finetune(config: InstructionFinetuneConfig, output_dir: Path) -> int:
    check_config(config)
    gangs = setup_gangs(
        device=config.device, tensor_parallel_size=config.tensor_parallel_size, replicas=config.fsdp_replicas
    )
    with gangs:  # tears the process group down, waiting for all ranks on success
        setup_run_logging(output_dir, gangs.root.rank)
        return train(config, output_dir, gangs)


def check_config(config: InstructionFinetuneConfig) -> None:
    """Catch impossible settings before any work starts."""
    positive = ["max_seq_len", "max_num_tokens", "max_num_steps", "gradient_accumulation", "checkpoint_every_n_steps",
                "publish_metrics_every_n_steps", "tensor_parallel_size", "fsdp_replicas", "loss_chunk_size"]
    for key in positive:
        if getattr(config, key) < 1:
            raise ConfigError(f"config key '{key}' must be at least 1, got {getattr(config, key)}")
    for key in ("keep_last_n_checkpoints", "keep_last_n_models", "validate_every_n_steps", "max_num_data_epochs"):
        value = getattr(config, key)
        if value is not None and value < 1:
            raise ConfigError(f"config key '{key}' must be at least 1 or null, got {value}")
    if config.max_num_tokens < config.max_seq_len:
        raise ConfigError(
            f"config key 'max_num_tokens' ({config.max_num_tokens}) must be at least max_seq_len "
            f"({config.max_seq_len}): a batch holds whole rows"
        )
    if config.data_parallelism == "ddp" and config.fsdp_replicas > 1:
        raise ConfigError(f"config key 'fsdp_replicas' ({config.fsdp_replicas}) needs data_parallelism=fsdp "
                          f"(HSDP shards within replicas); DDP replicates over all ranks: use fsdp_replicas=1")


@dataclasses.dataclass
class StepStats:
    """Sums over the steps since the last publish (kept on device: no host sync per step)."""

    loss_sum: torch.Tensor
    targets: int = 0
    tokens: int = 0
    computed_tokens: int = 0
    examples: int = 0
    steps: int = 0
    grad_norm: float = 0.0
    start: float = dataclasses.field(default_factory=time.perf_counter)


def train(config: InstructionFinetuneConfig, output_dir: Path, gangs: Gangs) -> int:
    device = gangs.device
    dtype = resolve_dtype(config.dtype, device)
    source = resolve_model_source(config.model, checkpoint_dir=config.resume_checkpoint_dir)
    tokenizer = resolve_tokenizer(config.tokenizer, source)
    model_config = source.config
    check_parallel_layout(model_config, tensor_parallel_size=config.tensor_parallel_size,
                          data_parallelism=config.data_parallelism,
                          activation_checkpointing=config.activation_checkpointing)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} tokens but model {source.description} only {model_config.vocab_size}"
        )

    train_examples = read_examples(
        config.dataset, tokenizer, split=config.train_split, format=_format(config), max_seq_len=config.max_seq_len,
        on_too_long=config.example_too_long, skip_malformed=config.skip_malformed_lines,
    )
    log.info("train data (%s): %s", train_examples.source.description, train_examples.stats.summary())
    valid_examples = None
    if config.validate_every_n_steps is not None:
        valid_examples = read_examples(
            config.dataset, tokenizer, split=config.valid_split, format=_format(config), max_seq_len=config.max_seq_len,
            on_too_long=config.example_too_long, skip_malformed=config.skip_malformed_lines,
        )
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    reader = BatchReader(
        train_examples, max_seq_len=config.max_seq_len, max_num_tokens=config.max_num_tokens, seed=config.seed,
        packing=config.packing, max_num_data_epochs=config.max_num_data_epochs, dp_size=gangs.dp.size,
        dp_rank=gangs.dp.rank, gradient_accumulation=config.gradient_accumulation, pad_id=pad_id,
    )

    # Build on meta, parallelize, materialize, then load: no rank holds the full model.
    mixed = config.mixed_precision and dtype != torch.float32
    param_dtype = torch.float32 if mixed else dtype
    torch.manual_seed(config.seed)
    model = build_model(model_config, device="meta", dtype=param_dtype)
    model = parallelize_llama(
        model, gangs, data_parallelism=config.data_parallelism, activation_checkpointing=config.activation_checkpointing,
        compile=config.torch_compile, reshard_after_forward=config.fsdp_reshard_after_forward,
        param_dtype=dtype if mixed else None, reduce_dtype=torch.float32,
    )
    model.to_empty(device=device)
    model.reset_buffers()
    checkpoints = CheckpointManager(
        output_dir / "checkpoints", is_main=gangs.is_main, barrier=gangs.root.barrier,
        keep_last_n_checkpoints=config.keep_last_n_checkpoints, keep_last_n_models=config.keep_last_n_models,
    )
    checkpoints.remove_incomplete()
    resume_step = checkpoints.latest_resumable_step()
    if resume_step is None:
        if source.checkpoint is not None:
            log.info("loading weights from %s", source.description)
            load_checkpoint(model, source.checkpoint)
        else:
            log.info("no checkpoint for %s: random initialisation (seed %d)", source.description, config.seed)
            model.init_weights(config.seed)

    optimizer = build_optimizer(
        model, learning_rate=config.learning_rate, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
    scheduler = build_scheduler(
        optimizer, schedule=config.lr_schedule, warmup_steps=config.warmup_steps, max_num_steps=config.max_num_steps,
        final_lr_scale=config.final_lr_scale,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    model_config_dict = dataclasses.asdict(model_config)

    step = 0
    if resume_step is not None:
        log.info("resuming from %s", checkpoints.dir / f"step_{resume_step}")
        extra = checkpoints.load(resume_step, model=model, optimizer=optimizer, model_config=model_config_dict)
        step = extra["step"]
        scheduler.load_state_dict(extra["scheduler"])
        reader.load_state_dict(extra["reader"])
        scaler.load_state_dict(extra["scaler"])
        _restore_rng(extra.get("rng"), gangs)

    def export_model(directory: Path) -> None:
        # FSDP x TP weights are (_StridedShard, Shard) DTensors, whose gather torch does as
        # two all-gathers and warns about on every rank at every save; gathers do not
        # reduce, so the result is exact and the warning is noise.
        logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
        items = iter_full_state_dict(model, rank0_only=True)
        if gangs.is_main:
            save_hf_state_dict(items, model_config, directory, dtype=DTYPES[config.save_model_dtype], tokenizer=tokenizer)
        else:
            for _ in items:  # take part in the gathers
                pass

    def save_checkpoint() -> None:
        extra = {
            "step": step, "scheduler": scheduler.state_dict(), "reader": reader.state_dict(),
            "scaler": scaler.state_dict(), "rng": _rng_state(),
        }
        path = checkpoints.save(step, model=model, optimizer=optimizer, extra=extra, model_config=model_config_dict,
                                export_model=export_model)
        log.info("saved checkpoint %s", path)

    recorders = MetricBag(output_dir, config.metric_recorders, wandb_project=config.wandb_project,
                          config=config_to_dict(config), start_step=step) if gangs.is_main else None
    peak_tflops, peak_source = device_peak_tflops(device, config.peak_tflops)
    flops_per_token = model_flops_per_token(model_config, config.max_seq_len)
    log.info("model: %s, %s params, MFU peak: %s", source.description,
             f"{sum(p.numel() for p in model.parameters()):,}", peak_source)
    # FSDP casts parameters itself (MixedPrecisionPolicy); one process and DDP need autocast.
    fsdp = gangs.dp.size > 1 and config.data_parallelism == "fsdp"
    autocast = torch.autocast(device.type, dtype=dtype) if mixed and not fsdp else contextlib.nullcontext()
    stop = _StopSignal()
    stats = StepStats(loss_sum=torch.zeros((), device=device))
    saved_step = step if resume_step is not None else None
    progress = TrainingProgress(total=config.max_num_steps, start=step, enabled=gangs.is_main)
    model.train()
    with progress, stop:
        while step < config.max_num_steps:
            batches = reader.next_step_batches()
            if batches is None:
                log.info("data exhausted after %d epochs", config.max_num_data_epochs)
                break
            accumulate_gradients(model, batches, gangs=gangs, autocast=autocast, scaler=scaler,
                                 loss_chunk_size=config.loss_chunk_size, stats=stats)
            lr = optimizer.param_groups[0]["lr"]
            grad_norm = optimizer_step(model, optimizer, scheduler, scaler, max_grad_norm=config.max_grad_norm)
            step += 1
            stats.steps += 1
            progress.advance(step)
            if step % config.publish_metrics_every_n_steps == 0 or step == config.max_num_steps:
                stats.grad_norm = float(grad_norm)
                values = _publish(stats, gangs, lr, peak_tflops, flops_per_token, reader.epoch)
                if recorders is not None:
                    recorders.record("train", step, values)
                    progress.log(f"step {step} " + format_metrics(values))
                stats = StepStats(loss_sum=torch.zeros((), device=device))
            if valid_examples is not None and step % config.validate_every_n_steps == 0:
                values = validate(model, valid_examples, config, gangs, autocast, pad_id)
                if recorders is not None:
                    recorders.record("valid", step, values)
                    progress.log(f"valid step {step} " + format_metrics(values))
            stopping = stop.requested(gangs)
            if step % config.checkpoint_every_n_steps == 0 or stopping:
                save_checkpoint()
                saved_step = step
            if stopping:
                log.warning("stopped by signal at step %d; checkpoint saved, re-run the same command to resume", step)
                break
    if saved_step != step:
        save_checkpoint()
    if recorders is not None:
        recorders.close()
    return 0


def accumulate_gradients(model, batches, *, gangs: Gangs, autocast, scaler, loss_chunk_size: int,
                         stats: StepStats) -> None:
    """Forward and backward over one optimizer step's micro-batches.

    Each micro-batch's loss is summed over its target tokens and divided by the
    target tokens of the whole step on all dp ranks, so the gradient does not depend
    on how the step is split into micro-batches or ranks.
    """
    device = gangs.device
    # Counted and reduced on the host (gloo serves CPU tensors on GPU runs too), so
    # the step never waits for the device.
    step_targets = torch.tensor(sum(b.num_target_tokens for b in batches), dtype=torch.int64)
    gangs.dp.all_reduce(step_targets)
    # FSDP/DDP average gradients over dp ranks; scaling by dp.size makes it a sum.
    norm = gangs.dp.size / max(int(step_targets), 1)
    for batch in batches:
        target_index_N = target_positions(batch.labels_BT).to(device, non_blocking=True)
        batch = batch.to(device, non_blocking=True)
        with autocast:
            hidden = model(batch.tokens_BT, positions_BT=batch.positions_BT,
                           document_ids_BT=batch.document_ids_BT, return_hidden=True)
            loss_sum = chunked_cross_entropy_sum(hidden, model.lm_head, batch.labels_BT,
                                                 chunk_size=loss_chunk_size, target_index_N=target_index_N)
        scaler.scale(loss_sum * norm).backward()
        stats.loss_sum += loss_sum.detach()
        stats.targets += batch.num_target_tokens
        stats.tokens += batch.num_tokens
        stats.computed_tokens += batch.tokens_BT.numel()
        stats.examples += batch.num_examples


def optimizer_step(model, optimizer, scheduler, scaler, *, max_grad_norm: float | None) -> torch.Tensor:
    """Unscale, clip, step, schedule; returns the gradient norm before clipping (on device)."""
    scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm(model, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return grad_norm


def validate(model, examples, config, gangs: Gangs, autocast, pad_id: int) -> dict[str, Any]:
    """Mean loss per target token over the validation split."""
    model.eval()
    loss_sum = torch.zeros((), device=gangs.device)
    targets = torch.zeros((), device=gangs.device, dtype=torch.int64)
    with torch.no_grad(), autocast:
        for batch in iter_validation_batches(examples, max_seq_len=config.max_seq_len,
                                             max_num_tokens=config.max_num_tokens, packing=config.packing,
                                             dp_size=gangs.dp.size, dp_rank=gangs.dp.rank, pad_id=pad_id):
            target_index_N = target_positions(batch.labels_BT).to(gangs.device, non_blocking=True)
            batch = batch.to(gangs.device)
            hidden = model(batch.tokens_BT, positions_BT=batch.positions_BT, document_ids_BT=batch.document_ids_BT,
                           return_hidden=True)
            loss_sum += chunked_cross_entropy_sum(hidden, model.lm_head, batch.labels_BT,
                                                  chunk_size=config.loss_chunk_size, target_index_N=target_index_N)
            targets += batch.num_target_tokens
    gangs.dp.all_reduce(loss_sum)
    gangs.dp.all_reduce(targets)
    model.train()
    return {"loss": float(loss_sum) / max(int(targets), 1), "target_tokens": int(targets)}


def _format(config: InstructionFinetuneConfig) -> str | None:
    return None if config.dataset_format == "auto" else config.dataset_format


def _publish(stats: StepStats, gangs: Gangs, lr: float, peak_tflops, flops_per_token: int, epoch: int) -> dict[str, Any]:
    elapsed = time.perf_counter() - stats.start
    sums = torch.tensor([float(stats.loss_sum), stats.targets, stats.tokens, stats.computed_tokens, stats.examples],
                        dtype=torch.float64, device=gangs.device)
    gangs.dp.all_reduce(sums)
    loss_sum, targets, tokens, computed, examples = sums.tolist()
    values: dict[str, Any] = {
        "loss": loss_sum / max(targets, 1.0),
        "lr": lr,
        "grad_norm": stats.grad_norm,
        "target_tokens_per_s": targets / elapsed,
        "tokens_per_s": tokens / elapsed,
        "examples": int(examples),
        "epoch": epoch + 1,
        "elapsed_s": elapsed,
    }
    if peak_tflops is not None:
        # Tensor-parallel ranks share the work of one dp rank, so the peak counts every GPU.
        values["mfu"] = computed * flops_per_token / elapsed / (peak_tflops * 1e12 * gangs.root.size)
    if gangs.device.type == "cuda":
        values["peak_memory_gib"] = torch.cuda.max_memory_allocated(gangs.device) / 2**30
        torch.cuda.reset_peak_memory_stats(gangs.device)
    return values


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: dict[str, Any] | None, gangs: Gangs) -> None:
    if not state:
        return
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and gangs.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], gangs.device)


class _StopSignal:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, saves and exits."""

    def __init__(self) -> None:
        self.flag = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.flag:  # a second signal: stop now
            raise KeyboardInterrupt
        log.warning("received signal %d: finishing the step, then saving a checkpoint", signum)
        self.flag = True

    def requested(self, gangs: Gangs) -> bool:
        if gangs.root.size == 1:
            return self.flag
        # A host tensor (gloo serves it on GPU runs too): no device sync per step.
        flag = torch.tensor(int(self.flag))
        gangs.root.all_reduce(flag, op="max")  # every rank must stop at the same step
        return bool(flag.item())


INSTRUCTION_FINETUNE_COMMAND = recipe_command(
    help="fine-tune a language model on instruction data",
    config_class=InstructionFinetuneConfig,
    run=run_instruction_finetune,
    sweep_prefix="ft",
)
