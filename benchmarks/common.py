"""Shared pieces of the training-speed benchmarks: device setup, the
measured bf16 matmul peak, timing with CUDA events after warm-up, MFU, peak
memory, ft's real training step, and the JSON result file.

How a variant is timed (`time_training`):

- `warmup` steps first (compilation, cuDNN/flash plan selection, allocator
  growth, optimizer state creation), then the peak-memory counters are reset;
- `steps` timed steps: one CUDA event before the first, one after the last, and
  a pair around each step (no host sync in between), so the window covers every
  gap (data collation, host work, launch stalls) and the per-step events give
  the median and spread; on CPU the host clock;
- throughput = tokens of the timed steps / window time. For fixed shapes the
  median-step figure is reported beside it.

MFU = achieved FLOP/s / peak, with FLOPs per token from `ft.models.model_flops_per_token`
(torchtitan's count: 6 x (non-embedding params + output projection) + 12 x layers x
heads x head_dim x seq), against both the bf16 matmul peak measured in the same
process (8192^3, random data) and the vendor's dense bf16 spec (989 TFLOP/s for
H100/H200).

The ft step is the recipe's own: `ft.training.step.accumulate_gradients`
(forward, chunked cross-entropy, backward over a step's micro-batches), then
unscale / clip / optimizer step / zero_grad / scheduler step exactly as the
recipe's loop does.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))  # run from a checkout without `pip install -e .`

import torch  # noqa: E402

from ft.gang import Gangs  # noqa: E402
from ft.training.activation_offloading import offloading_loss_fn  # noqa: E402
from ft.training.step import accumulate_gradients, next_token_loss, optimizer_step  # noqa: E402
from ft.training.step_stats import StepStats  # noqa: E402
from ft.training.metrics import device_peak_tflops  # noqa: E402
from ft.training.optim import build_optimizer, build_scheduler  # noqa: E402

GiB = 2**30


# ---------------------------------------------------------------------------------
# Arguments and environment


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny dims and few steps: a CPU smoke test")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON to this file")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 15; tiny 2)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip variants not started within this many seconds of the start (each is recorded)")
    parser.add_argument("--profile-dir", type=Path, default=None,
                        help="after timing, profile 2 more steps of each variant; top kernels to DIR/<variant>.txt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss-chunk-size", type=int, default=1024, help="ft's chunked cross-entropy chunk (recipe default)")
    parser.add_argument("--max-memory-gib", type=float, default=70.0,
                        help="report whether each variant's peak reserved memory stays under this")


def resolve_steps(args: argparse.Namespace) -> tuple[int, int]:
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    steps = args.steps if args.steps is not None else (2 if args.tiny else 15)
    return warmup, steps


def setup_torch(device: torch.device) -> None:
    if device.type == "cuda":
        # TF32 only touches float32 matmuls (none in bf16 runs); it matches what HF users get from Trainer(tf32=True).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Many distinct shapes (padded batches) and per-block graphs: don't give up compiling after 8 recompiles.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name, device_count=torch.cuda.device_count(), cuda=torch.version.cuda,
            device_memory_gib=round(props.total_memory / GiB, 1), multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info["device_name"] = platform.processor() or "cpu"
    return info


# ---------------------------------------------------------------------------------
# Timing


def measure_matmul_peak(device: torch.device, *, tiny: bool = False) -> dict[str, Any]:
    """TFLOP/s of one large bf16 matmul on random data (median of 20 after 5 warm-ups).

    Several input pairs rotate so no run reads operands another left in L2; random,
    never zeros (zeros run faster than real data).
    """
    n = 256 if tiny or device.type != "cuda" else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(1234)
    pairs = [(torch.randn(n, n, device=device, dtype=dtype, generator=gen),
              torch.randn(n, n, device=device, dtype=dtype, generator=gen)) for _ in range(3)]
    out = torch.empty(n, n, device=device, dtype=dtype)
    times: list[float] = []
    for i in range(25):
        a, b = pairs[i % len(pairs)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b, out=out)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            elapsed = time.perf_counter() - t0
        if i >= 5:
            times.append(elapsed)
    if not torch.isfinite(out).all():
        raise RuntimeError("the matmul peak measurement produced non-finite values")
    median = statistics.median(times)
    del pairs, out
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * n**3 / median / 1e12,
            "median_ms": median * 1e3}


def spec_peak_tflops(device: torch.device) -> float | None:
    tflops, _ = device_peak_tflops(device)
    return tflops


def cuda_timed(fn, *, warmup: int, steps: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return {"median_ms": times[len(times) // 2], "min_ms": times[0]}


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy."""
    src = torch.empty(GiB, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    result = cuda_timed(lambda: dst.copy_(src), warmup=3, steps=10)
    return 2 * GiB / (result["median_ms"] / 1e3)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float | None]:
    if device.type != "cuda":
        return {"peak_memory_allocated_gib": None, "peak_memory_reserved_gib": None}
    return {"peak_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / GiB,
            "peak_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB}


@dataclasses.dataclass
class StepCounts:
    """What one training step processed (host numbers, known without a sync)."""

    tokens: int  # non-padding tokens
    targets: int  # tokens with a loss
    computed: int  # tokens the model computed (B x T, padding included)
    flops: float  # model FLOPs of the step (torchtitan count over computed tokens)
    loss: Any = None  # a device tensor (mean loss of the step), read after timing


@dataclasses.dataclass
class Timing:
    step_ms: list[float]
    window_s: float
    counts: list[StepCounts]
    setup_s: float

    def summary(self, *, peak_tflops: float | None, spec_tflops: float | None, world_size: int = 1) -> dict[str, Any]:
        tokens = sum(c.tokens for c in self.counts)
        targets = sum(c.targets for c in self.counts)
        computed = sum(c.computed for c in self.counts)
        flops = sum(c.flops for c in self.counts)
        s = self.window_s
        fixed_shape = len({c.computed for c in self.counts}) == 1
        out: dict[str, Any] = {
            "timed_steps": len(self.step_ms),
            "window_s": s,
            "step_time_ms_median": statistics.median(self.step_ms),
            "step_time_ms_min": min(self.step_ms),
            "step_time_ms_max": max(self.step_ms),
            "tokens_per_s": tokens / s,  # non-padding tokens
            "target_tokens_per_s": targets / s,
            "computed_tokens_per_s": computed / s,
            "padding_fraction": 1 - tokens / computed if computed else 0.0,
            "tokens_per_step": tokens / len(self.counts),
            "achieved_tflops": flops / s / 1e12,
            "setup_s": self.setup_s,
        }
        if fixed_shape:
            out["tokens_per_s_from_median_step"] = self.counts[0].tokens / (statistics.median(self.step_ms) / 1e3)
        for key, peak in (("mfu_measured_peak", peak_tflops), ("mfu_spec_peak", spec_tflops)):
            out[key] = flops / s / (peak * 1e12 * world_size) if peak else None
        losses = [float(c.loss) for c in self.counts if c.loss is not None]
        if losses:
            out["loss_first"], out["loss_last"] = losses[0], losses[-1]
            out["losses"] = losses
        return out


def time_training(
    step: Callable[[], StepCounts],
    *,
    device: torch.device,
    warmup: int,
    steps: int,
    setup_start: float,
) -> Timing:
    """Run `warmup` untimed steps, then `steps` timed ones (see the module doc)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    setup_s = time.perf_counter() - setup_start
    reset_peak_memory(device)
    counts: list[StepCounts] = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        window = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        window[0].record()
        for start, end in events:
            start.record()
            counts.append(step())
            end.record()
        window[1].record()
        window[1].synchronize()
        step_ms = [start.elapsed_time(end) for start, end in events]
        window_s = window[0].elapsed_time(window[1]) / 1e3
    else:
        step_ms = []
        t_window = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            counts.append(step())
            step_ms.append((time.perf_counter() - t0) * 1e3)
        window_s = time.perf_counter() - t_window
    return Timing(step_ms=step_ms, window_s=window_s, counts=counts, setup_s=setup_s)


# Kernel name fragments -> the share of a step they are counted under (first match wins).
KERNEL_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("sdpa", "flash", "fmha", "attention", "attn", "cudnn")),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "splitk")),
    ("optimizer", ("adam", "multi_tensor_apply")),
    ("memset/memcpy", ("memset", "memcpy")),
    ("triton (compiled elementwise and reductions)", ("triton_",)),
)


def kernel_breakdown(events: Any, steps: int) -> list[tuple[str, float, int]]:
    """(category, device ms per step, kernels per step) over the profiled kernels."""
    totals: dict[str, list[float]] = {}
    for event in events:
        if str(getattr(event, "device_type", "")).split(".")[-1] != "CUDA" or "#" in event.key:
            continue  # host-side ops and annotations (`Optimizer.step#AdamW.step`): their kernels count
        name = event.key.lower()
        category = next((c for c, keys in KERNEL_CATEGORIES if any(k in name for k in keys)), "other kernels")
        entry = totals.setdefault(category, [0.0, 0])
        entry[0] += event.self_device_time_total / 1e3
        entry[1] += event.count
    rows = [(c, ms / steps, round(n / steps)) for c, (ms, n) in totals.items()]
    return sorted(rows, key=lambda row: -row[1])


def profile_steps(step: Callable[[], StepCounts], *, device: torch.device, path: Path, steps: int = 2) -> None:
    """Profile a few more steps: the device time per step by kernel category, then the
    top kernels by their own device time, go to `path` (a small text file)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    events = prof.key_averages()
    lines = [f"device time per step by kernel category ({steps} steps profiled)"]
    breakdown = kernel_breakdown(events, steps)
    total = sum(ms for _, ms, _ in breakdown)
    for category, ms, count in breakdown:
        lines.append(f"  {category:<48} {ms:9.2f} ms  {100 * ms / max(total, 1e-9):5.1f}%  {count:6d} kernels")
    lines.append(f"  {'total':<48} {total:9.2f} ms")
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=70, max_name_column_width=100)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n\n" + table)


def free_memory(device: torch.device) -> None:
    """Between variants: drop compiled graphs and cached blocks so each starts clean."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------
# ft's training step (the recipe's functions)


@dataclasses.dataclass
class FtTrainer:
    """ft's optimizer step on a parallelized model, as `instruction_finetune.train` runs it."""

    model: torch.nn.Module
    gangs: Gangs
    autocast: Any
    loss_chunk_size: int
    max_grad_norm: float | None = 1.0
    learning_rate: float = 1e-5
    activation_offloading: bool = False
    optimizer: str = "fused"  # AdamW: "fused" (torch's kernel) | "compiled" (ft.training.compiled_adamw)

    def __post_init__(self) -> None:
        self.loss_fn = offloading_loss_fn(next_token_loss(self.loss_chunk_size), enabled=self.activation_offloading,
                                          device=self.gangs.device)
        self.optimizer = build_optimizer(self.model, learning_rate=self.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                         weight_decay=0.1, implementation=self.optimizer)
        self.scheduler = build_scheduler(self.optimizer, schedule="constant", warmup_steps=0, max_num_steps=10**6,
                                         final_lr_scale=1.0)
        self.scaler = torch.amp.GradScaler(self.gangs.device.type, enabled=False)  # bf16 needs no loss scaling

    def step(self, batches: list[Any]) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; returns this rank's summed loss (device tensor)."""
        stats = StepStats.zero(self.gangs.device)
        accumulate_gradients(self.model, batches, gangs=self.gangs, autocast=self.autocast, scaler=self.scaler,
                             loss_fn=self.loss_fn, stats=stats)
        optimizer_step(self.model, self.optimizer, self.scheduler, self.scaler, max_grad_norm=self.max_grad_norm)
        return stats.loss_sum


def ft_autocast(device: torch.device, precision: str, dp_size: int = 1) -> Any:
    """The recipe's rule: fp32 master weights compute under autocast when not sharded
    (FSDP's MixedPrecisionPolicy casts instead)."""
    if precision == "mixed" and dp_size == 1:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class FullRowBatch:
    """A micro-batch of full rows (one document per row, no padding) in the shape of
    `ft.data.Batch`. `document_ids_BT=None` sends the model down its plain causal
    path (flash / cuDNN SDPA); the packed path takes `ft.data.Batch` itself."""

    tokens_BT: torch.Tensor
    labels_BT: torch.Tensor
    positions_BT: torch.Tensor | None
    document_ids_BT: torch.Tensor | None
    num_target_tokens: int
    num_tokens: int
    num_examples: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "FullRowBatch":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return dataclasses.replace(self, tokens_BT=move(self.tokens_BT), labels_BT=move(self.labels_BT),
                                   positions_BT=move(self.positions_BT), document_ids_BT=move(self.document_ids_BT))


def random_full_rows(*, batch_size: int, seq_len: int, vocab_size: int, generator: torch.Generator,
                     through_packed_path: bool = False) -> FullRowBatch:
    """Random tokens, next-token labels (the last position has none), on the CPU in
    pinned memory where CUDA exists, as a data loader would hand them over."""
    tokens_BT = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    labels_BT = torch.full_like(tokens_BT, -100)
    labels_BT[:, :-1] = tokens_BT[:, 1:]
    positions_BT = document_ids_BT = None
    if through_packed_path:
        positions_BT = torch.arange(seq_len).expand(batch_size, seq_len).contiguous()
        document_ids_BT = torch.zeros_like(tokens_BT)
    if torch.cuda.is_available():
        tokens_BT, labels_BT = tokens_BT.pin_memory(), labels_BT.pin_memory()
    return FullRowBatch(tokens_BT=tokens_BT, labels_BT=labels_BT, positions_BT=positions_BT,
                        document_ids_BT=document_ids_BT, num_target_tokens=batch_size * (seq_len - 1),
                        num_tokens=batch_size * seq_len, num_examples=batch_size)


# ---------------------------------------------------------------------------------
# Results


class ResultWriter:
    """Collects results, rewrites the JSON file after each one (a run killed by its
    time limit keeps what it measured), prints one line per result."""

    def __init__(self, path: Path | None, header: dict[str, Any]) -> None:
        self.path = path
        self.doc: dict[str, Any] = {**header, "results": []}
        self.start = time.perf_counter()
        self.write()

    def add(self, result: dict[str, Any]) -> None:
        self.doc["results"].append(result)
        self.write()
        print(format_result(result), flush=True)

    def set(self, key: str, value: Any) -> None:
        self.doc[key] = value
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)

    def over_budget(self, budget_s: float | None) -> bool:
        return budget_s is not None and time.perf_counter() - self.start > budget_s


def format_result(r: dict[str, Any]) -> str:
    name = r.get("name", "?")
    if r.get("status") != "ok":
        return f"{name:<34} {r.get('status')}: {str(r.get('error', r.get('reason', '')))[:200]}"

    def f(key: str, fmt: str) -> str:
        value = r.get(key)
        return "-" if value is None else format(value, fmt)

    return (f"{name:<34} tok/s {f('tokens_per_s', ',.0f'):>9}  target tok/s {f('target_tokens_per_s', ',.0f'):>9}  "
            f"MFU {f('mfu_measured_peak', '.1%'):>6} (spec {f('mfu_spec_peak', '.1%')})  "
            f"step {f('step_time_ms_median', '.1f')} ms  peak {f('peak_memory_allocated_gib', '.1f')}/"
            f"{f('peak_memory_reserved_gib', '.1f')} GiB  setup {f('setup_s', '.0f')} s")


def error_result(name: str, error: BaseException) -> dict[str, Any]:
    status = "oom" if isinstance(error, torch.OutOfMemoryError) else "error"
    tail = "".join(traceback.format_exception(error)[-6:])
    return {"name": name, "status": status, "error": f"{type(error).__name__}: {error}"[:2000], "traceback": tail[-4000:]}


def ratio(results: list[dict[str, Any]], num: str, den: str, key: str = "tokens_per_s") -> float | None:
    by_name = {r["name"]: r for r in results if r.get("status") == "ok"}
    if num in by_name and den in by_name and by_name[den].get(key):
        return by_name[num][key] / by_name[den][key]
    return None
