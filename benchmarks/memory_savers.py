"""Full fine-tuning under a memory cap: ft's memory savers on one GPU, and the memory
model's prediction against the measured peak, in one process.

Workload: 2 packed rows of 2048 tokens per step (the document-masked path), random
weights, full fine-tuning. Each variant is a set of recipe keys (`optimizer`,
`optimizer_in_backward`, `optimizer_cpu_offload`, `bf16_stochastic_rounding`,
`activation_offloading`, `activation_checkpointing`, `mixed_precision`,
`loss_chunk_size`) run with the recipe's own pieces: `create_model` +
`parallelize_model`, `ft.training.optimizers.build_optimizer`,
`accumulate_gradients`, then `step_in_backward` or `optimizer_step`.

- `capped` variants run with `torch.cuda.set_per_process_memory_fraction` set to
  `--cap-gb` (default 24 GB, decimal, an RTX 4090's memory); the target is peak
  allocated <= 18 GiB (torchtune publishes 18.9 GiB for Llama-3.1-8B) and >= 70% of
  the tokens/s of the best unconstrained variant of the same arch in this run;
- every variant reports `predicted_peak_gib` (`ft.training.memory_model`) beside
  `peak_memory_allocated_gib` and the error in percent (target: within 10%).

Run on one GPU:
  python benchmarks/memory_savers.py --out memory_savers.json
`--device cpu --tiny` is a smoke test (tiny dims, no cap, no memory numbers);
`--archs llama3_1_8b` and `--variants a,b` select.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import memory_profile  # noqa: E402
import torch  # noqa: E402

from ft.gang import setup_gangs, teardown_gangs  # noqa: E402
from ft.models import create_model, find_arch, model_flops_per_token  # noqa: E402
from ft.models.parallelize import parallelize_model  # noqa: E402
from ft.training.activation_offloading import offloading_loss_fn  # noqa: E402
from ft.training.memory_model import GIB, MemoryPlan, parameter_shapes, predict_memory  # noqa: E402
from ft.training.optim import build_scheduler  # noqa: E402
from ft.training.optimizers import OptimizerSettings, build_optimizer, step_in_backward  # noqa: E402
from ft.training.step import accumulate_gradients, next_token_loss, optimizer_step  # noqa: E402
from ft.training.step_stats import StepStats  # noqa: E402

TORCHTUNE_8B_PEAK_GIB = 18.9
TARGET_PEAK_GIB = 18.0
TARGET_THROUGHPUT_RATIO = 0.70


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    capped: bool
    keys: dict[str, Any]


# Recipe keys per variant; unset keys take the recipe's defaults below.
DEFAULTS = {"optimizer": "adamw", "optimizer_in_backward": False, "optimizer_cpu_offload": False,
            "bf16_stochastic_rounding": False, "activation_offloading": False, "activation_checkpointing": "none",
            "mixed_precision": True, "loss_chunk_size": 1024, "max_grad_norm": 1.0}
PURE_BF16 = {"mixed_precision": False}
IN_BACKWARD = {"optimizer_in_backward": True, "max_grad_norm": None}
VARIANTS = [
    # Unconstrained references (the 8B in mixed precision needs ~135 GiB: expected to OOM on one H200).
    Variant("mixed_adamw", False, {}),
    Variant("mixed_adamw_selective", False, {"activation_checkpointing": "selective"}),
    Variant("bf16_adamw", False, {**PURE_BF16}),
    Variant("bf16_adamw_selective", False, {**PURE_BF16, "activation_checkpointing": "selective"}),
    # One saver at a time on the pure-bf16 selective baseline (prediction accuracy per saver).
    Variant("bf16_adafactor_selective", False, {**PURE_BF16, "optimizer": "adafactor",
                                                "activation_checkpointing": "selective"}),
    Variant("bf16_adamw_inbwd_selective", False, {**PURE_BF16, **IN_BACKWARD, "activation_checkpointing": "selective"}),
    Variant("bf16_adamw_sr_selective", False, {**PURE_BF16, "bf16_stochastic_rounding": True,
                                               "activation_checkpointing": "selective"}),
    Variant("bf16_adamw8bit_selective", False, {**PURE_BF16, "optimizer": "adamw8bit",
                                                "activation_checkpointing": "selective"}),
    Variant("bf16_adamw4bit_selective", False, {**PURE_BF16, "optimizer": "adamw4bit",
                                                "activation_checkpointing": "selective"}),
    # Where the 24 GB line's time goes, uncapped: full recompute alone, then Adafactor with rounding
    # stepped after backward, then the same stepped in backward (cap_adafactor_inbwd_full_sr's keys).
    Variant("bf16_adamw_full", False, {**PURE_BF16, "activation_checkpointing": "full", "loss_chunk_size": 256}),
    Variant("bf16_adafactor_full_sr", False, {**PURE_BF16, "optimizer": "adafactor", "bf16_stochastic_rounding": True,
                                              "max_grad_norm": None, "activation_checkpointing": "full",
                                              "loss_chunk_size": 256}),
    Variant("bf16_adamw_actoffload", False, {**PURE_BF16, "activation_offloading": True}),
    Variant("mixed_adamw_cpuoffload_selective", False, {"optimizer_cpu_offload": True,
                                                        "activation_checkpointing": "selective"}),
    # Candidates for 8B in 24 GB.
    Variant("cap_adafactor_inbwd_full", True, {**PURE_BF16, **IN_BACKWARD, "optimizer": "adafactor",
                                               "activation_checkpointing": "full", "loss_chunk_size": 256}),
    Variant("cap_adafactor_inbwd_full_sr", True, {**PURE_BF16, **IN_BACKWARD, "optimizer": "adafactor",
                                                  "bf16_stochastic_rounding": True, "activation_checkpointing": "full",
                                                  "loss_chunk_size": 256}),
    Variant("cap_adafactor_inbwd_selective", True, {**PURE_BF16, **IN_BACKWARD, "optimizer": "adafactor",
                                                    "activation_checkpointing": "selective", "loss_chunk_size": 256}),
    Variant("cap_adafactor_inbwd_selective_sr", True, {**PURE_BF16, **IN_BACKWARD, "optimizer": "adafactor",
                                                       "bf16_stochastic_rounding": True,
                                                       "activation_checkpointing": "selective", "loss_chunk_size": 256}),
    Variant("cap_adamw4bit_inbwd_full_sr", True, {**PURE_BF16, **IN_BACKWARD, "optimizer": "adamw4bit",
                                                  "bf16_stochastic_rounding": True, "activation_checkpointing": "full",
                                                  "loss_chunk_size": 256}),
    Variant("cap_adamw_cpuoffload_inbwd_full", True, {**PURE_BF16, **IN_BACKWARD, "optimizer_cpu_offload": True,
                                                      "activation_checkpointing": "full", "loss_chunk_size": 256}),
]
BY_NAME = {v.name: v for v in VARIANTS}


def tiny_config(arch: str) -> Any:
    real = find_arch(arch)[1]
    return dataclasses.replace(real, vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160,
                               max_seq_len=16384, bos_id=1, eos_id=2)


def compiles_blocks(device: torch.device, args: argparse.Namespace) -> bool:
    return device.type == "cuda" and not args.no_compile


def memory_plan(config: Any, keys: dict[str, Any], tokens: int, compiled: bool) -> MemoryPlan:
    return MemoryPlan(
        compiled=compiled, model_config=config, dtype="bfloat16", mixed_precision=keys["mixed_precision"], optimizer=keys["optimizer"],
        optimizer_in_backward=keys["optimizer_in_backward"], optimizer_cpu_offload=keys["optimizer_cpu_offload"],
        stochastic_rounding=keys["bf16_stochastic_rounding"], activation_checkpointing=keys["activation_checkpointing"],
        activation_offloading=keys["activation_offloading"], max_num_tokens=tokens,
        loss_chunk_size=keys["loss_chunk_size"],
    )


def make_step(config: Any, keys: dict[str, Any], gangs: Any, args: argparse.Namespace,
              batch: Any) -> tuple[Callable[[], common.StepCounts], torch.nn.Module]:
    device = gangs.device
    mixed = keys["mixed_precision"]
    compile_blocks = compiles_blocks(device, args)
    model = create_model(
        config, device=device, dtype=torch.float32 if mixed else torch.bfloat16, seed=args.seed,
        parallelize=lambda m: parallelize_model(m, gangs, activation_checkpointing=keys["activation_checkpointing"],
                                                compile=compile_blocks),
    )
    model.train()
    settings = OptimizerSettings(name=keys["optimizer"], learning_rate=1e-5, betas=(0.9, 0.95), eps=1e-8,
                                 weight_decay=0.1, in_backward=keys["optimizer_in_backward"],
                                 cpu_offload=keys["optimizer_cpu_offload"],
                                 stochastic_rounding=keys["bf16_stochastic_rounding"], seed=args.seed)
    optimizer = build_optimizer(model, settings)
    scheduler = build_scheduler(optimizer, schedule="constant", warmup_steps=0, max_num_steps=10**6,
                                final_lr_scale=1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    autocast = common.ft_autocast(device, "mixed" if mixed else "bf16")
    loss_fn = offloading_loss_fn(next_token_loss(keys["loss_chunk_size"]), enabled=keys["activation_offloading"],
                                 device=device)
    flops = model_flops_per_token(config, batch.tokens_BT.shape[1]) * batch.num_tokens

    def step() -> common.StepCounts:
        stats = StepStats.zero(device)
        accumulate_gradients(model, [batch], gangs=gangs, autocast=autocast, scaler=scaler, loss_fn=loss_fn,
                             stats=stats)
        if keys["optimizer_in_backward"]:
            step_in_backward(optimizer, scheduler)
        else:
            optimizer_step(model, optimizer, scheduler, scaler, max_grad_norm=keys["max_grad_norm"])
        return common.StepCounts(tokens=batch.num_tokens, targets=batch.num_target_tokens, computed=batch.num_tokens,
                                 flops=flops, loss=stats.loss_sum / batch.num_target_tokens)

    return step, model


def run_variant(variant: Variant, config: Any, shapes: dict, gangs: Any, args: argparse.Namespace, warmup: int,
                steps: int, ctx: dict[str, Any], batch: Any) -> dict[str, Any]:
    device = gangs.device
    keys = {**DEFAULTS, **variant.keys}
    predicted = predict_memory(memory_plan(config, keys, batch.num_tokens, compiles_blocks(device, args)), shapes)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, args.cap_gb * 1e9 / total) if variant.capped and not args.no_cap else 1.0
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    start = time.perf_counter()
    step, model = make_step(config, keys, gangs, args, batch)
    timing = common.time_training(step, device=device, warmup=warmup, steps=steps, setup_start=start)
    result = {"name": variant.name, "status": "ok", "capped": variant.capped, "keys": keys,
              **timing.summary(peak_tflops=ctx["peak_tflops"], spec_tflops=ctx["spec_tflops"]),
              **common.peak_memory(device),
              "predicted_peak_gib": predicted.peak / GIB,
              "predicted_components_gib": predicted.components_gib()}
    measured = result.get("peak_memory_allocated_gib")
    if measured:
        result["prediction_error_pct"] = 100 * (result["predicted_peak_gib"] - measured) / measured
    if args.profile_memory:
        result["memory_profile"] = memory_profile.profile_peak(step, device)
    if args.profile_dir is not None:  # where the step's time goes: the top ops by device time
        common.profile_steps(step, device=device, path=args.profile_dir / f"{variant.name.replace('/', '_')}.txt")
    del model, step
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="llama3_2_1b,llama3_1_8b")
    parser.add_argument("--variants", default="default", help="comma-separated names, or 'default' (all)")
    parser.add_argument("--cap-gb", type=float, default=24.0, help="memory cap of the capped variants (decimal GB)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the blocks")
    parser.add_argument("--no-cap", action="store_true", help="run capped variants without their cap (to profile them)")
    parser.add_argument("--profile-memory", action="store_true",
                        help="one more step with the allocator's history: what is alive at the peak")
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    warmup, steps = common.resolve_steps(args)
    names = [v.name for v in VARIANTS] if args.variants == "default" else args.variants.split(",")
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(BY_NAME)}")
    seq_len, rows = (64, 2) if args.tiny else (args.seq_len, args.rows)

    gangs = setup_gangs(device=args.device)
    device = gangs.device
    common.setup_torch(device)
    peak = common.measure_matmul_peak(device, tiny=args.tiny)
    ctx = {"peak_tflops": peak["tflops"], "spec_tflops": common.spec_peak_tflops(device)}
    torchao_version = None
    try:
        import torchao

        torchao_version = torchao.__version__
    except ImportError:
        pass
    header = {
        "benchmark": "memory_savers", "tiny": args.tiny, "compiled": compiles_blocks(device, args),
        "environment": common.environment(device),
        "torchao": torchao_version, "matmul_peak": peak, "warmup_steps": warmup, "timed_steps": steps,
        "workload": {"rows": rows, "seq_len": seq_len, "packed": True, "cap_gb": args.cap_gb},
        "targets": {"peak_allocated_gib": TARGET_PEAK_GIB, "throughput_ratio": TARGET_THROUGHPUT_RATIO,
                    "prediction_error_pct": 10.0, "torchtune_8b_peak_gib": TORCHTUNE_8B_PEAK_GIB},
    }
    writer = common.ResultWriter(args.out, header)
    try:
        for arch in args.archs.split(","):
            config = tiny_config(arch) if args.tiny else find_arch(arch)[1]
            shapes = parameter_shapes(config)
            batch = common.random_full_rows(batch_size=rows, seq_len=seq_len, vocab_size=config.vocab_size,
                                            generator=torch.Generator().manual_seed(args.seed),
                                            through_packed_path=True)
            for name in names:
                variant = BY_NAME[name]
                full_name = f"{arch}/{name}"
                if writer.over_budget(args.budget_s):
                    writer.add({"name": full_name, "status": "skipped", "reason": "over --budget-s"})
                    continue
                try:
                    result = run_variant(variant, config, shapes, gangs, args, warmup, steps, ctx, batch)
                    result["name"] = full_name
                except Exception as error:  # an OOM or a missing torchao must not lose the other variants
                    result = common.error_result(full_name, error)
                common.free_memory(device)
                writer.add(result)
            summarize(writer, arch)
    finally:
        teardown_gangs(gangs)
    return 0


def summarize(writer: common.ResultWriter, arch: str) -> None:
    """Per arch: the best unconstrained tokens/s, each capped variant's ratio to it and
    whether it meets the targets."""
    results = [r for r in writer.doc["results"] if r["name"].startswith(arch + "/") and r.get("status") == "ok"]
    free = [r for r in results if not r["capped"]]
    best = max(free, key=lambda r: r["tokens_per_s"], default=None)
    summary: dict[str, Any] = {"best_unconstrained": best and best["name"],
                               "best_unconstrained_tokens_per_s": best and best["tokens_per_s"], "capped": {}}
    for r in results:
        if not r["capped"]:
            continue
        ratio = r["tokens_per_s"] / best["tokens_per_s"] if best else None
        peak = r.get("peak_memory_allocated_gib")
        summary["capped"][r["name"]] = {
            "tokens_per_s": r["tokens_per_s"], "ratio_to_best_unconstrained": ratio, "peak_allocated_gib": peak,
            "meets_targets": bool(peak is not None and peak <= TARGET_PEAK_GIB and ratio is not None
                                  and ratio >= TARGET_THROUGHPUT_RATIO),
        }
    summary["prediction_errors_pct"] = {r["name"]: r.get("prediction_error_pct") for r in results}
    writer.set(f"summary_{arch}", summary)


if __name__ == "__main__":
    sys.exit(main())
