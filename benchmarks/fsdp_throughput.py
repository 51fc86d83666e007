"""Multi-GPU training throughput of ft (workload d and the 1B FSDP / TP layouts).

Launch one process per GPU:

    torchrun --standalone --nproc-per-node N benchmarks/fsdp_throughput.py \\
        --arch llama3_1_8b --seq-len 8192 --batch-size 1 --parallel fsdp --out d_N.json

- `--parallel fsdp`: FSDP2 over all N processes (dp=N), `--batch-size` rows per GPU;
- `--parallel tp`: tensor parallel over all N processes (tp=N, dp=1), every rank
  sees the same batch.

The model is built as the recipe builds it (meta, `parallelize_model`: per-block
activation checkpointing, per-block compile, FSDP2 per block then root with
`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` for `--precision mixed`,
`to_empty`, `init_weights`), and trained with the recipe's step (`common.FtTrainer`)
on fixed random tokens (one batch per dp rank, reused every step, so the loss falls
as the model memorises it: a visible sanity check of the parallel training).

Reported (rank 0 writes the JSON): tokens/s per GPU (global tokens / time / N), MFU
per GPU against the matmul peak measured on every rank in this run and against the
spec, the largest peak memory over ranks, the global loss of each timed step.
With one process (N=1) no process group exists and FSDP is not applied.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from ft.gang import setup_gangs, teardown_gangs  # noqa: E402
from ft.models import create_model, find_arch, model_flops_per_token  # noqa: E402
from ft.models.parallelize import parallelize_model  # noqa: E402

TORCHTITAN_2GPU_TOKENS_PER_S = 8_704  # torchtitan's figure: 2 x H200, FSDP, 8B, seq 8192, batch 1, compile + selective AC


def tiny_config(arch: str):
    return dataclasses.replace(find_arch(arch)[1], vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                               ffn_dim=160, max_seq_len=16384)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama3_1_8b", help="a registered arch")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=1, help="rows per data-parallel rank")
    parser.add_argument("--parallel", choices=("fsdp", "tp"), default="fsdp")
    parser.add_argument("--precision", choices=("mixed", "bf16"), default="mixed",
                        help="mixed: fp32 master weights, bf16 compute (ft's default); bf16: all in bf16")
    parser.add_argument("--ac", choices=("none", "selective", "full"), default="selective")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile each block (default on; always off on CPU)")
    parser.add_argument("--reshard-after-forward", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--lr", type=float, default=3e-4)
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    warmup, steps = common.resolve_steps(args)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    gangs = setup_gangs(device=args.device, tensor_parallel_size=world if args.parallel == "tp" else 1)
    try:
        rc = run(args, gangs, warmup, steps)
        gangs.root.barrier()  # rank 0 may still be writing; tearing gloo down under it aborts the job
        return rc
    finally:
        teardown_gangs(gangs)


def run(args: argparse.Namespace, gangs: Any, warmup: int, steps: int) -> int:
    device = gangs.device
    common.setup_torch(device)
    world = gangs.root.size
    config = tiny_config(args.arch) if args.tiny else find_arch(args.arch)[1]
    seq_len, batch_size = (64, 2) if args.tiny else (args.seq_len, args.batch_size)
    compile_ = args.compile and device.type == "cuda"

    peak = common.measure_matmul_peak(device, tiny=args.tiny)
    peaks = gangs.root.all_gather_object(peak["tflops"])
    peak_tflops = min(peaks)  # the slowest GPU bounds a synchronous step
    spec_tflops = common.spec_peak_tflops(device)
    name = (f"ft_{args.parallel}{world}_{args.precision}_{'compile' if compile_ else 'eager'}_ac-{args.ac}"
            f"_{batch_size}x{seq_len}")
    header = {
        "benchmark": "fsdp_throughput", "arch": args.arch, "tiny": args.tiny, "parallel": args.parallel,
        "world_size": world, "dp_size": gangs.dp.size, "tp_size": gangs.tp.size,
        "environment": common.environment(device), "matmul_peak": {**peak, "tflops_per_rank": peaks},
        "spec_peak_tflops": spec_tflops, "warmup_steps": warmup, "timed_steps": steps,
        "model_config": dataclasses.asdict(config), "flops_per_token": model_flops_per_token(config, seq_len),
        "goal": ">= 1.1x torchtitan's 8.7k tokens/s per GPU on 2 x H200; 4 GPUs >= 95% of the 2-GPU per-GPU figure",
    }
    writer = common.ResultWriter(args.out if gangs.is_main else None, header)
    if gangs.is_main:
        print(f"{name} on {world} x {header['environment']['device_name']}: matmul peak "
              f"{min(peaks):.0f}-{max(peaks):.0f} TFLOP/s", flush=True)

    result: dict[str, Any] = {
        "name": name, "impl": "ft", "parallel": args.parallel, "world_size": world, "precision": args.precision,
        "compile": compile_, "activation_checkpointing": args.ac, "batch_size_per_dp_rank": batch_size,
        "seq_len": seq_len, "reshard_after_forward": args.reshard_after_forward,
    }
    try:
        result.update(measure(args, gangs, config, seq_len, batch_size, compile_, warmup, steps, peak_tflops,
                              spec_tflops))
        result["status"] = "ok"
    except Exception as error:
        result.update(common.error_result(name, error))
        print(f"rank {gangs.root.rank}: {result['error']}", file=sys.stderr, flush=True)
    if gangs.is_main:
        writer.add(result)
        if result.get("status") == "ok" and args.arch == "llama3_1_8b" and seq_len == 8192:
            writer.set("ratio_to_torchtitan_2gpu", result["tokens_per_s_per_gpu"] / TORCHTITAN_2GPU_TOKENS_PER_S)
    return 0 if result.get("status") == "ok" else 1


def measure(args, gangs, config, seq_len, batch_size, compile_, warmup, steps, peak_tflops, spec_tflops) -> dict:
    device = gangs.device
    setup_start = time.perf_counter()
    mixed = args.precision == "mixed"
    model = create_model(
        config, device=device, dtype=torch.float32 if mixed else torch.bfloat16, seed=args.seed,
        parallelize=lambda model: parallelize_model(
            model, gangs, data_parallelism="fsdp", activation_checkpointing=args.ac, compile=compile_,
            reshard_after_forward=args.reshard_after_forward, param_dtype=torch.bfloat16 if mixed else None,
            reduce_dtype=torch.float32,
        ),
    )
    model.train()
    trainer = common.FtTrainer(model=model, gangs=gangs, autocast=common.ft_autocast(device, args.precision,
                                                                                       gangs.dp.size),
                               loss_chunk_size=args.loss_chunk_size, learning_rate=args.lr)
    # Fixed random tokens; tp ranks of one dp group share a batch (same dp rank -> same seed).
    gen = torch.Generator().manual_seed(args.seed * 1000 + gangs.dp.rank)
    batch = common.random_full_rows(batch_size=batch_size, seq_len=seq_len, vocab_size=config.vocab_size,
                                    generator=gen)
    dp = gangs.dp.size
    flops = batch.num_tokens * model_flops_per_token(config, seq_len)
    loss_sums: list[torch.Tensor] = []

    def step() -> common.StepCounts:
        loss_sums.append(trainer.step([batch]))
        # Global counts: every dp rank processes one such batch.
        return common.StepCounts(tokens=batch.num_tokens * dp, targets=batch.num_target_tokens * dp,
                                 computed=batch.num_tokens * dp, flops=flops * dp)

    gangs.root.barrier()
    timing = common.time_training(step, device=device, warmup=warmup, steps=steps, setup_start=setup_start)
    losses = torch.stack(loss_sums[warmup:warmup + steps]).double()
    gangs.dp.all_reduce(losses)
    mean_losses = (losses / (batch.num_target_tokens * dp)).tolist()
    for counts, loss in zip(timing.counts, mean_losses):
        counts.loss = loss
    out = timing.summary(peak_tflops=peak_tflops, spec_tflops=spec_tflops, world_size=gangs.root.size)
    out["tokens_per_s_per_gpu"] = out["tokens_per_s"] / gangs.root.size
    out["losses_warmup"] = [float(x) / (batch.num_target_tokens * dp) for x in _reduced(loss_sums[:warmup], gangs)]
    memory = common.peak_memory(device)
    per_rank = gangs.root.all_gather_object(memory)
    for key in memory:
        values = [m[key] for m in per_rank if m[key] is not None]
        out[key] = max(values) if values else None
    out["peak_memory_allocated_gib_per_rank"] = [m["peak_memory_allocated_gib"] for m in per_rank]
    medians = gangs.root.all_gather_object(out["step_time_ms_median"])
    out["step_time_ms_median_per_rank"] = medians
    if args.profile_dir is not None:  # every rank: a step is collective
        common.profile_steps(step, device=device,
                             path=args.profile_dir / f"fsdp_{args.parallel}{gangs.root.size}_rank{gangs.root.rank}.txt")
    return out


def _reduced(loss_sums: list[torch.Tensor], gangs) -> list[float]:
    if not loss_sums:
        return []
    t = torch.stack(loss_sums).double()
    gangs.dp.all_reduce(t)
    return t.tolist()


if __name__ == "__main__":
    sys.exit(main())
