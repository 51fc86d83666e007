"""`ft lm generate`: generate responses for a dataset's prompts and score them.

    ft lm generate SAVE_DIR --no-sweep-dir --config checkpoint_dir=OUT/checkpoints \
        model=checkpoint_step_1000 generator_config.temperature=0.1 dataset=test.jsonl

Writes `SAVE_DIR/output/rank_K.jsonl` (one object per prompt, in dataset order:
id, prompt, response, token ids, log-probs, score, finish reason, reference and
its per-row scores) with a readable `rank_K.txt` beside it, and, when rows carry
references, `SAVE_DIR/metrics/generate.json` with the accuracy, also printed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ft.data import PromptRow, read_prompts
from ft.errors import CheckpointError, ConfigError
from ft.generation import Generation, GenerateStats, GeneratorConfig, ScoreSummary, generate
from ft.recipes.cli_support import recipe_command
from ft.recipes.lm_setup import resolve_dtype, resolve_model_source, resolve_tokenizer, setup_run_logging

log = logging.getLogger("ft")

__all__ = ["GENERATE_COMMAND", "GenerateConfig", "GeneratorConfig", "run_generate", "shard_rows"]


@dataclass(kw_only=True)
class GenerateConfig:
    model: str = "ft_tiny"
    """A model card, a checkpoint path, or with checkpoint_dir: last_checkpoint / checkpoint_step_N."""
    checkpoint_dir: str | None = None
    """OUT/checkpoints of a training run, for model=last_checkpoint|checkpoint_step_N."""
    tokenizer: str | None = None
    """Default: the model card's tokenizer, or the one saved beside the checkpoint."""
    dataset: str = "ft_default_sft"
    """A dataset card, a directory of splits, or one JSONL file."""
    split: str = "test"
    """Split of a dataset directory or card (a single file is read whole)."""
    dtype: str = "auto"
    device: str = "auto"
    tensor_parallel_size: int = 1
    generator_config: GeneratorConfig = field(default_factory=GeneratorConfig)


@dataclass(frozen=True)
class _Ranks:
    """This process's place among data-parallel generation ranks."""

    rank: int = 0
    size: int = 1


def run_generate(config: GenerateConfig, output_dir: Path) -> int:
    config.generator_config.validate()
    ranks = _setup_ranks(config)
    device = _resolve_device(config.device)
    setup_run_logging(output_dir, ranks.rank)

    source = resolve_model_source(config.model, checkpoint_dir=config.checkpoint_dir)
    if source.checkpoint is None:
        raise CheckpointError(
            f"{source.description} has no checkpoint to generate with; train it first "
            "(ft lm instruction_finetune OUT) and pass checkpoint_dir=OUT/checkpoints model=last_checkpoint"
        )
    tokenizer = resolve_tokenizer(config.tokenizer, source)
    from ft.models import load_model

    dtype = resolve_dtype(config.dtype, device)
    model = load_model(source.card_name or source.checkpoint, device=device, dtype=dtype).eval()
    log.info("model: %s on %s (%s)", source.description, device, dtype)

    rows = read_prompts(config.dataset, tokenizer, split=_split_for(config.dataset, config.split))
    begin, end = shard_rows(len(rows), ranks.rank, ranks.size)
    my_rows = rows[begin:end]
    log.info("generating for %d of %d prompts (rows %d-%d) from %s", len(my_rows), len(rows), begin, end - 1, config.dataset)

    stats = GenerateStats()
    start = time.perf_counter()
    with _GenerateProgress(total=len(my_rows), enabled=ranks.rank == 0) as progress:
        generations = generate(
            model, tokenizer, [row.prompt_tokens for row in my_rows], config.generator_config,
            progress=progress.advance, stats=stats,
        )
    elapsed = time.perf_counter() - start
    log.info(
        "generated %d tokens for %d prompts in %.1fs (%.0f tokens/s, decode step: %s)",
        stats.num_generated_tokens, len(my_rows), elapsed, stats.num_generated_tokens / max(elapsed, 1e-9), stats.decode_path,
    )

    summary = write_outputs(output_dir / "output", ranks.rank, my_rows, generations)
    if summary.num_rows and ranks.rank == 0:
        metrics = {
            **summary.metrics(),
            "num_prompts": len(rows),
            "num_generated_tokens": stats.num_generated_tokens,
            "tokens_per_second": stats.num_generated_tokens / max(elapsed, 1e-9),
            "model": source.description,
            "dataset": config.dataset,
        }
        metrics_dir = output_dir / "metrics"
        metrics_dir.mkdir(parents=True, exist_ok=True)
        (metrics_dir / "generate.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(_metrics_line(metrics), flush=True)
        log.info("metrics written to %s", metrics_dir / "generate.json")
    elif ranks.rank == 0:
        log.info("no row carries a reference answer: nothing to score")
    log.info("outputs written to %s", output_dir / "output")
    return 0


def _setup_ranks(config: GenerateConfig) -> _Ranks:
    # Multi-process generation (data-parallel ranks splitting the dataset, tensor
    # parallel) runs on the gangs of ft.gang (issue 5), which have not landed yet.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if config.tensor_parallel_size < 1:
        raise ConfigError(f"config key 'tensor_parallel_size' must be at least 1, got {config.tensor_parallel_size}")
    if config.tensor_parallel_size != 1 or world_size != 1:
        raise ConfigError(
            f"config key 'tensor_parallel_size'={config.tensor_parallel_size} with {world_size} process(es): "
            "multi-process generation needs ft.gang, which this build does not have yet; run one process "
            "with tensor_parallel_size=1"
        )
    return _Ranks()


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"config key 'device': {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device': cuda was asked for but no CUDA device is available")
    return device


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


def write_outputs(out_dir: Path, rank: int, rows: Sequence[PromptRow], generations: Sequence[Generation]) -> ScoreSummary:
    """rank_K.jsonl and rank_K.txt, in dataset order; returns the scores of this rank's rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = ScoreSummary()
    with open(out_dir / f"rank_{rank}.jsonl", "w", encoding="utf-8") as jsonl, open(
        out_dir / f"rank_{rank}.txt", "w", encoding="utf-8"
    ) as txt:
        for row, gen in zip(rows, generations, strict=True):
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
                record.update(summary.add(gen.text, row.reference))
            jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
            txt.write(_readable(record))
    return summary


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
    """A rich progress bar over prompts, with generated tokens/s; a no-op off rank 0."""

    def __init__(self, *, total: int, enabled: bool) -> None:
        self.progress = Progress(
            TextColumn("[bold]generate"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=Console(file=sys.stderr),
            disable=not enabled,
        )
        self.task = self.progress.add_task("generate", total=total, rate="")
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


GENERATE_COMMAND = recipe_command(
    help="generate responses for a dataset's prompts and score them",
    config_class=GenerateConfig,
    run=run_generate,
    sweep_prefix="gen",
)
