"""`ft lm generate`: generate responses for a dataset's prompts and score them.

    ft lm generate SAVE_DIR --no-sweep-dir --config checkpoint_dir=OUT/checkpoints \
        model=checkpoint_step_1000 generator_config.temperature=0.1 dataset=test.jsonl

Outputs are written as prompts finish (`ft.generation.partial_outputs`): a killed
run keeps them and re-running the same command generates only the rest. Writes
`SAVE_DIR/output/rank_K.jsonl` (one object per prompt, in dataset order:
id, prompt, response, token ids, log-probs, score, finish reason, reference and
its per-row scores) with a readable `rank_K.txt` beside it, and, when rows carry
references, `SAVE_DIR/metrics/generate.json` with the accuracy, also printed.

Under torchrun / srun, data-parallel ranks split the dataset into contiguous
chunks (rank K writes rank_K.*, so the files concatenated in rank order are in
dataset order) and `tensor_parallel_size` shards the model over the tp gang.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ft.data import PromptRow, read_prompts
from ft.config import config_hash
from ft.errors import CheckpointError, ConfigError
from ft.gang import Gang, Gangs, setup_gangs
from ft.generation import Generation, GenerateStats, GeneratorConfig, ScoreSummary, generate
from ft.generation.partial_outputs import PartialOutputs
from ft.lora.adapter_model import adapter_source, create_model_with_adapter
from ft.models import ModelSource, create_model
from ft.models.parallelize import check_parallel_layout, parallelize_model
from ft.recipes.generate_config import GenerateConfig
from ft.recipes.lm_setup import resolve_dtype, resolve_model_source, resolve_tokenizer, setup_run_logging

log = logging.getLogger("ft")

__all__ = ["GenerateConfig", "GeneratorConfig", "run_generate", "shard_rows", "write_outputs"]


def run_generate(config: GenerateConfig, output_dir: Path) -> int:
    config.generator_config.validate()
    gangs = setup_gangs(device=config.device, tensor_parallel_size=config.tensor_parallel_size)
    with gangs:  # tears the process group down, waiting for all ranks on success
        setup_run_logging(output_dir, gangs.root.rank)
        return _generate(config, output_dir, gangs)


def _generate(config: GenerateConfig, output_dir: Path, gangs: Gangs) -> int:
    device = gangs.device
    if config.lora_dir is not None:
        if config.checkpoint_dir is not None:
            raise ConfigError("config keys 'lora_dir' and 'checkpoint_dir' both name the weights; give one: "
                              "checkpoint_dir=OUT/checkpoints model=checkpoint_step_N also runs a LoRA run's adapter")
        source = adapter_source(config.lora_dir, base=config.model)
    else:
        source = resolve_model_source(config.model or "ft_tiny", checkpoint_dir=config.checkpoint_dir)
    if source.checkpoint is None:
        raise CheckpointError(
            f"{source.description} has no checkpoint to generate with; train it first "
            "(ft lm instruction_finetune OUT) and pass checkpoint_dir=OUT/checkpoints model=last_checkpoint"
        )
    check_parallel_layout(source.config, tensor_parallel_size=gangs.tp.size)
    tokenizer = resolve_tokenizer(config.tokenizer, source)
    if tokenizer.vocab_size > source.config.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} tokens but model {source.description} only {source.config.vocab_size}"
        )
    dtype = resolve_dtype(config.dtype, device)
    model = _load_model(source, gangs, dtype)
    log.info("model: %s on %s (%s), tensor parallel size %d", source.description, device, dtype, gangs.tp.size)

    generator_config = config.generator_config
    if gangs.tp.size > 1 and (generator_config.cuda_graphs or generator_config.compile):
        # A capture or compile that failed on one rank and fell back there alone would
        # desynchronise the tp group's collectives: tp decoding stays eager.
        log.info("tensor parallel decoding runs eagerly (generator_config.cuda_graphs and compile are ignored)")
        generator_config = dataclasses.replace(generator_config, cuda_graphs=False, compile=False)

    rows = read_prompts(config.dataset, tokenizer, split=_split_for(config.dataset, config.split))
    begin, end = shard_rows(len(rows), gangs.dp.rank, gangs.dp.size)
    my_rows = rows[begin:end]
    log.info("generating for %d of %d prompts (rows %d-%d) from %s", len(my_rows), len(rows), begin, end - 1, config.dataset)

    # The tp ranks of a group hold the same generations; the group's first rank writes them.
    partial = PartialOutputs(output_dir / "output", gangs.dp.rank, row_ids=[row.id for row in my_rows],
                             fingerprint=config_hash(config)) if gangs.tp.rank == 0 else None
    pending = gangs.tp.broadcast_object(partial.pending() if partial is not None else None)

    def keep(batch: list[tuple[int, Generation]]) -> None:
        if partial is not None:
            for i, gen in batch:
                partial.add(pending[i], output_record(my_rows[pending[i]], gen))
            partial.sync()

    stats = GenerateStats()
    start = time.perf_counter()
    with _GenerateProgress(total=len(my_rows), done=len(my_rows) - len(pending), enabled=gangs.is_main) as progress:
        generate(model, tokenizer, [my_rows[i].prompt_tokens for i in pending], generator_config,
                 progress=progress.advance, stats=stats, on_batch=keep)
    elapsed = time.perf_counter() - start
    log.info(
        "generated %d tokens for %d prompts in %.1fs (%.0f tokens/s, decode step: %s)",
        stats.num_generated_tokens, len(pending), elapsed, stats.num_generated_tokens / max(elapsed, 1e-9),
        stats.decode_path,
    )

    summary, num_tokens_written = ScoreSummary(), 0
    if partial is not None:
        records = partial.finish()
        summary = write_records(output_dir / "output", gangs.dp.rank, records)
        partial.remove()
        num_tokens_written = sum(len(record["token_ids"]) for record in records)  # this run's and an earlier one's
    gathered = gangs.root.all_gather_object((gangs.tp.rank, summary, num_tokens_written))
    total, num_tokens = ScoreSummary(), 0
    for tp_rank, part, tokens in gathered:
        if tp_rank == 0:
            total, num_tokens = total.merge(part), num_tokens + tokens
    if gangs.is_main:
        _report(total, output_dir, num_prompts=len(rows), num_tokens=num_tokens, elapsed=time.perf_counter() - start,
                model=source.description, dataset=config.dataset)
    gangs.root.barrier()
    return 0


def _load_model(source: ModelSource, gangs: Gangs, dtype: torch.dtype) -> torch.nn.Module:
    """Built on meta, tensor-parallelized, then each rank reads only its shard. No data
    parallelism is applied: dp ranks decode different prompts, independently."""
    tp_only = dataclasses.replace(gangs, dp=Gang(0, 1, None))
    if source.adapter is not None:
        model = create_model_with_adapter(source, device=gangs.device, dtype=dtype,
                                          parallelize=lambda model: parallelize_model(model, tp_only))
        return model.eval()
    model = create_model(
        source.config, device=gangs.device, dtype=dtype, checkpoint=source.checkpoint,  # checked in _generate
        parallelize=lambda model: parallelize_model(model, tp_only),
    )
    return model.eval()


def _report(
    summary: ScoreSummary, output_dir: Path, *, num_prompts: int, num_tokens: int, elapsed: float, model: str,
    dataset: str,
) -> None:
    """SAVE_DIR/metrics/generate.json and the console line, from all ranks' scores."""
    if not summary.num_rows:
        log.info("no row carries a reference answer: nothing to score")
    else:
        metrics = {
            **summary.metrics(),
            "num_prompts": num_prompts,
            "num_generated_tokens": num_tokens,
            "tokens_per_second": num_tokens / max(elapsed, 1e-9),
            "model": model,
            "dataset": dataset,
        }
        metrics_dir = output_dir / "metrics"
        metrics_dir.mkdir(parents=True, exist_ok=True)
        (metrics_dir / "generate.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(_metrics_line(metrics), flush=True)
        log.info("metrics written to %s", metrics_dir / "generate.json")
    log.info("outputs written to %s", output_dir / "output")


def _split_for(dataset: str, split: str) -> str | None:
    # A single JSONL file is the whole dataset (`dataset=test.jsonl` as in fairseq2's
    # tutorial), whatever `split` says; read_prompts would reject a non-train split.
    return None if Path(dataset).expanduser().is_file() else split


def shard_rows(num_rows: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [begin, end) of data-parallel `rank`: contiguous, near-equal chunks, so the
    rank files concatenated in rank order are in dataset order."""
    per_rank, extra = divmod(num_rows, size)
    begin = rank * per_rank + min(rank, extra)
    return begin, begin + per_rank + (1 if rank < extra else 0)


def output_record(row: PromptRow, gen: Generation) -> dict[str, Any]:
    """One prompt's output object (without its scores, which `write_records` adds)."""
    record: dict[str, Any] = {
        "id": row.id,
        "prompt": row.prompt_text,
        "response": gen.text,
        "prompt_token_ids": gen.prompt_tokens,
        "token_ids": gen.tokens,
        "logprobs": [round(lp, 6) for lp in gen.logprobs],
        "score": gen.score,
        "finish_reason": gen.finish_reason,
    }
    if row.reference is not None:
        record["reference"] = row.reference
    return record


def write_records(out_dir: Path, rank: int, records: Sequence[dict[str, Any]]) -> ScoreSummary:
    """rank_K.jsonl and rank_K.txt from the records in dataset order, each scored against its
    reference; returns the scores of this rank's rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = ScoreSummary()
    with open(out_dir / f"rank_{rank}.jsonl", "w", encoding="utf-8") as jsonl, open(
        out_dir / f"rank_{rank}.txt", "w", encoding="utf-8"
    ) as txt:
        for record in records:
            if record.get("reference") is not None:
                record.update(summary.add(record["response"], record["reference"]))
            jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
            txt.write(_readable(record))
    return summary


def write_outputs(out_dir: Path, rank: int, rows: Sequence[PromptRow], generations: Sequence[Generation]) -> ScoreSummary:
    """rank_K.jsonl and rank_K.txt, in dataset order; returns the scores of this rank's rows."""
    return write_records(out_dir, rank, [output_record(row, gen) for row, gen in zip(rows, generations, strict=True)])


def _readable(record: dict[str, Any]) -> str:
    lines = [f"=== {record['id']} ===", "--- prompt ---", record["prompt"], "--- response ---", record["response"]]
    footer = f"[{record['finish_reason']}, {len(record['token_ids'])} tokens, score {record['score']:.3f}]"
    if "reference" in record:
        lines += ["--- reference ---", record["reference"]]
        if "correct" in record:
            verdict = "correct" if record["correct"] else "wrong"
            footer += f" answer {record['answer']} vs {record['expected_answer']}: {verdict}"
        footer += f", exact match: {record['exact_match']}"
    return "\n".join(lines + [footer, "", ""])


def _metrics_line(metrics: dict[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.2f}%"

    parts = [f"scored {metrics['num_rows']} rows"]
    if metrics["num_with_answer"]:
        parts.append(
            f"accuracy {pct(metrics['accuracy'])} (flexible {pct(metrics['accuracy_flexible'])}, "
            f"no '#### answer' in {pct(metrics['malformed_rate'])}) over {metrics['num_with_answer']} numeric answers"
        )
    parts.append(f"exact match {pct(metrics['exact_match'])}")
    return "generate: " + ", ".join(parts)


class _GenerateProgress:
    """A rich progress bar over prompts, with generated tokens/s and the time left; a no-op off rank 0."""

    def __init__(self, *, total: int, done: int = 0, enabled: bool) -> None:
        self.progress = Progress(
            TextColumn("[bold]generate"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            disable=not enabled,
        )
        self.task = self.progress.add_task("generate", total=total, completed=done, rate="")
        self.tokens = 0
        self.start = time.perf_counter()

    def __enter__(self) -> "_GenerateProgress":
        self.progress.__enter__()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def advance(self, prompts: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.progress.update(self.task, advance=prompts, rate=f"{rate:,.0f} tok/s")
