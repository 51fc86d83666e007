"""Generation throughput (tokens/s): ft's generator against transformers' `generate`
(default dynamic cache, and `cache_implementation="static"`) on the same random
weights, in one process.

    python benchmarks/generate_throughput.py --out gen_throughput.json            # GPU: llama3_2_1b, bf16
    python benchmarks/generate_throughput.py --device cpu --tiny --batch-sizes 1 2 \\
        --prompt-len 8 --new-tokens 8                                             # CPU smoke test

Every configuration decodes exactly `--new-tokens` tokens per row (no stop tokens;
transformers gets `min_new_tokens`), greedily, from random `--prompt-len`-token
prompts. The time is wall clock for the whole call (prefill included) after one
untimed warm-up call (compilation, CUDA graph capture), best of `--repeats`.
ft runs in each of `--ft-modes`: "eager", "cuda_graph" (decode step replayed from
a CUDA graph) and "compile" (torch.compile'd decode step inside the CUDA graph,
generate's default); the JSON says which path actually ran (a failed compile or
capture falls back). Variants of the decode step (`ft.generation.DecodeOptions`),
for side-by-side runs: "cuda_graph_full_cache" and "compile_full_cache" attend over
the whole static cache every step (the path before window buckets),
"compile_static_buckets" compiles each window bucket with its static length, and
"compile_autotune" compiles with mode="max-autotune-no-cudagraphs" (autotuned
Triton matmuls for the skinny decode GEMMs) inside ft's own CUDA graphs;
"compile_math_attention" runs attention through SDPA's math backend (compiled:
matmuls and one fused masked softmax), "compile_efficient_attention" through its
memory-efficient kernel, "compile_flex_attention" through FlexAttention's decoding
kernel, "compile_split_kv_attention" through ft's split-KV Triton kernels
(`ft.models.decode_attention`, the default on CUDA; "compile_split_kv_autotune_cdt" with
max-autotune and coordinate-descent tuning too), "compile_sdpa_attention" through SDPA's
own choice (the default before the split-KV kernels), "compile_cdt" with inductor's
coordinate-descent tuning (which also turns one-row matmuls into reductions that
inductor writes); "compile_untuned" compiles a batch-1 step without the tuning the default gives
it (`DecodeOptions.tune_one_row`); "compile_pick_outside" and "compile_cdt_pick_outside" pick the
greedy token after the captured step (before picking moved inside it); "compile_fused" (the default, as "compile") and "compile_unfused" /
"cuda_graph_unfused" run q/k/v and gate/up as one matmul each or one per
projection (`ft.generation.fused_projections`); "compile_one_stage_pick_tile_splits"
runs the default with two small-batch choices as before them (`MODE_CONSTANTS`): the
greedy pick over each row's whole vocabulary in one stage, split-KV attention in
splits of one key tile.

Memory-bandwidth use of ft's decode step: a prefill-only call (one new token) is
timed too, and `decode_step_s` = (whole call - prefill call) / (new tokens - 1).
A step must read every weight once (the embedding table only as the tied output
projection) plus the keys and values attention spans (the filled slots rounded up
to the cache's window bucket); `hbm_fraction` = those bytes / step time / `--hbm-tb-s`
(4.8 TB/s: H200). Launch overhead, sampling and the host loop count as step time.

Greedy agreement on trained weights: random weights tie the top tokens, so bf16
rounding decides them and ft and transformers differ for no fault of either.
`--train-steps N` first trains the model (fp32 master weights, bf16 autocast on
CUDA) for N steps on GSM8K's train split with ft's own training step, as
train_throughput.py's workload c tokenizes it (a byte-level BPE trained on the
file), then casts it to `--dtype` and benchmarks those weights. It also reports, for
`--agree-prompts` prompts of GSM8K's test split, how many of the first
`--agree-tokens` greedy tokens of ft (each mode) and of transformers (default
cache) agree: per prompt the length of the common prefix (greedy decoding diverges
for good after one different token), and the fraction of tokens so agreed.

    python benchmarks/generate_throughput.py --train-steps 300 --out gen_trained.json   # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benchmarks' modules (training)

from ft.generation import DecodeOptions, GenerateStats, Generator, GeneratorConfig, StaticKVCache  # noqa: E402
from ft.models import build_model, family_of, find_arch  # noqa: E402


class _NoTextTokenizer:
    """Generation needs a tokenizer only to decode text; benchmarks skip that."""

    stop_ids: list[int] = []

    def decode(self, ids) -> str:
        return ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the llama_debug arch instead of llama3_2_1b")
    parser.add_argument("--arch", default=None, help="any ft arch name (default: llama3_2_1b, or llama_debug with --tiny)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per configuration (the best counts)")
    parser.add_argument("--ft-modes", nargs="+", default=None, choices=list(FT_MODES),
                        help="default: cuda_graph and compile on CUDA, eager elsewhere")
    parser.add_argument("--hf-caches", nargs="*", default=["dynamic", "static"], choices=["dynamic", "static"],
                        help="transformers cache implementations to compare against (none: skip transformers)")
    parser.add_argument("--hbm-tb-s", type=float, default=None,
                        help="memory bandwidth for hbm_fraction (default: the GPU's datasheet figure, H200 4.8, H100 3.35)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    train = parser.add_argument_group("trained weights (greedy agreement)")
    train.add_argument("--train-steps", type=int, default=0, help="train on GSM8K for this many steps first (0: random weights)")
    train.add_argument("--gsm8k", type=Path, default=None,
                       help="GSM8K train.jsonl (default: shared/data/gsm8k/train.jsonl in or beside the checkout); "
                            "the test prompts come from test.jsonl beside it")
    train.add_argument("--train-tokens", type=int, default=8192, help="tokens per training step (packed rows)")
    train.add_argument("--train-lr", type=float, default=3e-4, help="peak learning rate (linear warmup, cosine decay)")
    train.add_argument("--tokenizer-vocab", type=int, default=4500, help="BPE pieces of the GSM8K tokenizer")
    train.add_argument("--agree-prompts", type=int, default=32, help="GSM8K test prompts for the agreement check")
    train.add_argument("--agree-tokens", type=int, default=32, help="greedy tokens compared per prompt")
    train.add_argument("--agree-modes", nargs="+", default=None, choices=list(FT_MODES),
                       help="ft modes checked for agreement (default: every --ft-modes; each compiles for the new batch)")
    return parser.parse_args(argv)


# Datasheet HBM bandwidths (TB/s) by device name, for hbm_fraction when --hbm-tb-s is not given.
DATASHEET_HBM_TB_S = {"H200": 4.8, "H100": 3.35}


def datasheet_hbm_tb_s(device: torch.device) -> float:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((tb_s for key, tb_s in DATASHEET_HBM_TB_S.items() if key in name), 4.8)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_best(fn: Callable[[], Any], *, repeats: int, device: torch.device) -> tuple[float, Any]:
    fn()  # warm-up: compilation, graph capture, allocator
    best, result = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ft's modes: GeneratorConfig's switches, and `Generator(decode_options=)` for the
# decode step's variants that only benchmarks choose.
FT_MODES: dict[str, dict[str, Any]] = {
    "eager": dict(cuda_graphs=False, compile=False),
    "cuda_graph": dict(cuda_graphs=True, compile=False),
    "compile": dict(cuda_graphs=True, compile=True),  # generate's default: window buckets, one dynamic compile
    # Batch 1 without coordinate-descent tuning (the default tunes one-row steps).
    "compile_untuned": dict(cuda_graphs=True, compile=True, decode_options=DecodeOptions(tune_one_row=False)),
    # Attention over the whole static cache every step: the path before window buckets.
    "cuda_graph_full_cache": dict(cuda_graphs=True, compile=False, decode_options=DecodeOptions(windowed=False)),
    "compile_full_cache": dict(cuda_graphs=True, compile=True, decode_options=DecodeOptions(windowed=False)),
    # Window buckets, each compiled with its own static length (up to 8 compiles).
    "compile_static_buckets": dict(cuda_graphs=True, compile=True, decode_options=DecodeOptions(dynamic_window=False)),
    # Inductor's autotuned Triton matmuls (the skinny decode GEMMs) inside ft's own CUDA graphs.
    "compile_autotune": dict(cuda_graphs=True, compile=True,
                             decode_options=DecodeOptions(compile_mode="max-autotune-no-cudagraphs")),
    # q/k/v and gate/up as one matmul each (generate's default) or one per projection (before fusion).
    "compile_fused": dict(cuda_graphs=True, compile=True, decode_options=DecodeOptions(fused_projections=True)),
    "compile_unfused": dict(cuda_graphs=True, compile=True, decode_options=DecodeOptions(fused_projections=False)),
    "cuda_graph_unfused": dict(cuda_graphs=True, compile=False, decode_options=DecodeOptions(fused_projections=False)),
    # Attention as matmuls and one fused masked softmax (SDPA's math backend, compiled).
    "compile_math_attention": dict(cuda_graphs=True, compile=True, decode_options=DecodeOptions(attention="math")),
    # SDPA's memory-efficient kernel instead of its own choice (cuDNN's on Hopper).
    "compile_efficient_attention": dict(cuda_graphs=True, compile=True,
                                        decode_options=DecodeOptions(attention="efficient_attention")),
    # FlexAttention's decoding kernel (keys split over thread blocks) instead of SDPA.
    "compile_flex_attention": dict(cuda_graphs=True, compile=True, decode_options=DecodeOptions(attention="flex")),
    # ft's split-KV Triton kernels (`ft.models.decode_attention`, the default on CUDA) or SDPA's choice.
    "compile_split_kv_attention": dict(cuda_graphs=True, compile=True,
                                       decode_options=DecodeOptions(attention="split_kv")),
    "compile_sdpa_attention": dict(cuda_graphs=True, compile=True, decode_options=DecodeOptions(attention="sdpa")),
    "compile_split_kv_autotune_cdt": dict(cuda_graphs=True, compile=True, decode_options=DecodeOptions(
        attention="split_kv", inductor_options=(("max_autotune", True), ("coordinate_descent_tuning", True)))),
    # Inductor's coordinate-descent tuning of its generated kernels' launch parameters.
    "compile_cdt": dict(cuda_graphs=True, compile=True,
                        decode_options=DecodeOptions(inductor_options=(("coordinate_descent_tuning", True),))),
    # Both: autotuned Triton matmuls where one is not a single row (batch 64), reductions where it is.
    "compile_autotune_cdt": dict(cuda_graphs=True, compile=True, decode_options=DecodeOptions(
        inductor_options=(("max_autotune", True), ("coordinate_descent_tuning", True)))),
    # Greedy picking and the loop's bookkeeping after the captured step, launched by the
    # host every token (before they moved inside the step).
    "compile_pick_outside": dict(cuda_graphs=True, compile=True, decode_options=DecodeOptions(pick_in_step=False)),
    "compile_cdt_pick_outside": dict(cuda_graphs=True, compile=True, decode_options=DecodeOptions(
        inductor_options=(("coordinate_descent_tuning", True),), pick_in_step=False)),
    # Few rows as before two small-batch choices: the greedy pick reducing each row's whole
    # vocabulary in one stage, and split-KV attention in one-tile splits however few.
    "compile_one_stage_pick_tile_splits": dict(cuda_graphs=True, compile=True),
}
# Module constants a mode sets while it runs (benchmarks only: the library has no switch for them).
MODE_CONSTANTS: dict[str, dict[tuple[str, str], Any]] = {
    "compile_one_stage_pick_tile_splits": {
        ("ft.generation.sampling", "PICK_PARALLELISM"): 1,
        ("ft.models.decode_attention", "MIN_KEYS_PER_SPLIT"): 64,
        ("ft.models.decode_attention", "MIN_SPLITS"): 1,
    },
}


@contextlib.contextmanager
def mode_constants(mode: str):
    import importlib

    saved = []
    try:
        for (module_name, name), value in MODE_CONSTANTS.get(mode, {}).items():
            module = importlib.import_module(module_name)
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def ft_generator(model, tokenizer, mode: str, *, max_gen_len: int, batch_size: int, stop_ids) -> Generator:
    settings = dict(FT_MODES[mode])
    decode_options = settings.pop("decode_options", DecodeOptions())
    config = GeneratorConfig(greedy=True, max_gen_len=max_gen_len, batch_size=batch_size, **settings)
    return Generator(model, tokenizer, config, stop_ids=stop_ids, decode_options=decode_options)


def bench_ft(model, prompts_BT: torch.Tensor, mode: str, args, device) -> dict[str, Any]:
    with mode_constants(mode):
        return _bench_ft(model, prompts_BT, mode, args, device)


def _bench_ft(model, prompts_BT: torch.Tensor, mode: str, args, device) -> dict[str, Any]:
    B = prompts_BT.shape[0]
    generator = ft_generator(model, _NoTextTokenizer(), mode, max_gen_len=args.new_tokens, batch_size=B, stop_ids=())
    prompts = prompts_BT.tolist()
    stats = GenerateStats()
    seconds, outputs = _time_best(lambda: generator(prompts, stats=stats), repeats=args.repeats, device=device)
    num_tokens = sum(len(o.tokens) for o in outputs)
    assert num_tokens == B * args.new_tokens, f"ft generated {num_tokens} tokens, expected {B * args.new_tokens}"
    result = {
        "impl": "ft", "mode": mode, "decode_path": stats.decode_path, "batch_size": B, "seconds": seconds,
        "tokens_per_s": num_tokens / seconds, "first_tokens": [o.tokens[:8] for o in outputs[:2]],
    }
    del generator, outputs
    if args.new_tokens > 1:
        prefill = ft_generator(model, _NoTextTokenizer(), mode, max_gen_len=1, batch_size=B, stop_ids=())
        prefill_s, _ = _time_best(lambda: prefill(prompts), repeats=args.repeats, device=device)
        del prefill
        windowed = FT_MODES[mode].get("decode_options", DecodeOptions()).windowed
        result.update(decode_bandwidth(model, B, args, seconds=seconds, prefill_s=prefill_s, windowed=windowed))
    _free(device)
    return result


def decode_bytes_per_step(model, batch_size: int, prompt_len: int, new_tokens: int, *,
                          windowed: bool = True) -> tuple[int, float]:
    """(weight bytes, mean KV bytes) one decode step reads, with the generator's cache
    layout: its max_len (a multiple of 16) and its window buckets (or the whole cache)."""
    params = {id(p): p for p in model.parameters()}  # a tied weight once
    weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
    embed = model.model.embed_tokens.weight
    if not model.config.tie_embeddings:  # the embedding table is only indexed, B rows
        weight_bytes -= embed.numel() * embed.element_size()
    max_len = -(-(prompt_len + new_tokens) // 16) * 16
    cache = StaticKVCache(model, batch_size=1, max_len=max_len)
    windows = [cache.window_for(prompt_len + t + 1) if windowed else max_len
               for t in range(new_tokens - 1)]  # decode steps 1..N-1
    config = model.config
    kv_per_slot = 2 * config.n_layers * batch_size * config.n_kv_heads * config.head_dim * embed.element_size()
    return weight_bytes, kv_per_slot * sum(windows) / max(len(windows), 1)


def decode_bandwidth(model, batch_size: int, args, *, seconds: float, prefill_s: float,
                     windowed: bool = True) -> dict[str, Any]:
    weight_bytes, kv_bytes = decode_bytes_per_step(model, batch_size, args.prompt_len, args.new_tokens,
                                                   windowed=windowed)
    result = {"prefill_s": prefill_s, "weight_bytes_per_step": weight_bytes, "kv_bytes_per_step": kv_bytes}
    if seconds <= prefill_s:  # timing noise on a tiny run: no step time to report
        return {**result, "decode_step_s": None, "hbm_fraction": None}
    step_s = (seconds - prefill_s) / (args.new_tokens - 1)
    return {**result, "decode_step_s": step_s,
            "hbm_fraction": (weight_bytes + kv_bytes) / step_s / (args.hbm_tb_s * 1e12)}


def build_hf_model(model, dtype: torch.dtype, device: torch.device):
    import transformers

    hf_config = transformers.LlamaConfig(**family_of(model).hf_config(model.config, dtype=dtype))
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(hf_config)
    hf.to(dtype).eval()
    hf.load_state_dict(model.state_dict(), strict=True)  # same parameter names: the same weights
    return hf


def bench_hf(hf, prompts_BT: torch.Tensor, cache: str, args, device) -> dict[str, Any]:
    B = prompts_BT.shape[0]
    input_ids = prompts_BT.to(device)
    kwargs: dict[str, Any] = dict(
        attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens, pad_token_id=0, num_beams=1, temperature=None, top_p=None, top_k=None,
    )
    if cache == "static":
        kwargs["cache_implementation"] = "static"

    def run():
        with torch.inference_mode():
            return hf.generate(input_ids, **kwargs)

    seconds, out = _time_best(run, repeats=args.repeats, device=device)
    new = out[:, input_ids.shape[1] :]
    assert new.shape == (B, args.new_tokens), f"transformers generated {tuple(new.shape)}"
    result = {
        "impl": "transformers", "mode": f"{cache}_cache", "batch_size": B, "seconds": seconds,
        "tokens_per_s": B * args.new_tokens / seconds, "first_tokens": new[:2, :8].tolist(),
    }
    del out
    _free(device)
    return result


def gsm8k_paths(args) -> tuple[Path, Path]:
    """(train.jsonl, test.jsonl beside it)."""
    from train_throughput import _default_gsm8k

    train = args.gsm8k or _default_gsm8k()
    return train, train.with_name("test.jsonl")


def train_on_gsm8k(model, tokenizer, train_path: Path, args, device: torch.device) -> dict[str, Any]:
    """Train `model` (float32 parameters) in place for `args.train_steps` steps on GSM8K
    with ft's own step (`common.FtTrainer`: chunked loss, clipping, AdamW), packed rows
    as the recipe reads them; bf16 autocast on CUDA. Returns the loss curve."""
    import common

    from ft.data import BatchReader, read_examples
    from ft.gang import setup_gangs, teardown_gangs
    from ft.training.optim import build_scheduler

    steps = args.train_steps
    max_seq_len = min(512, model.config.max_seq_len)
    examples = read_examples(train_path, tokenizer, format="gsm8k", max_seq_len=max_seq_len, on_too_long="truncate")
    reader = BatchReader(list(examples), max_seq_len=max_seq_len, max_num_tokens=max(args.train_tokens, max_seq_len),
                         seed=args.seed, pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0)
    gangs = setup_gangs(device=device.type)
    start = time.perf_counter()
    losses = []
    try:
        model.train()
        precision = "mixed" if device.type == "cuda" else "fp32"
        trainer = common.FtTrainer(model=model, gangs=gangs, autocast=common.ft_autocast(device, precision),
                                   loss_chunk_size=1024, learning_rate=args.train_lr)
        trainer.scheduler = build_scheduler(trainer.optimizer, schedule="cosine", warmup_steps=max(1, steps // 10),
                                            max_num_steps=steps, final_lr_scale=0.1)
        for step in range(steps):
            batches = reader.next_step_batches()
            loss_sum = trainer.step(batches)
            losses.append(loss_sum / max(sum(b.num_target_tokens for b in batches), 1))
            if (step + 1) % 50 == 0 or step + 1 == steps:
                print(f"train step {step + 1}/{steps}: loss {losses[-1].item():.3f}", file=sys.stderr, flush=True)
        del trainer
    finally:
        teardown_gangs(gangs)
        model.eval()
    curve = [round(x, 4) for x in torch.stack(losses).tolist()]
    tail = curve[-10:]
    return {"steps": steps, "examples": len(examples), "tokens_per_step": args.train_tokens, "lr": args.train_lr,
            "seconds": round(time.perf_counter() - start, 1), "final_loss": sum(tail) / len(tail),
            "loss_curve": curve[:: max(1, steps // 50)]}


def greedy_agreement(ft_tokens: list[list[int]], hf_tokens: list[list[int]], *, k: int,
                     stop_ids: set[int] = frozenset()) -> dict[str, Any]:
    """How far two greedy decodings of the same prompts agree in their first `k` tokens.

    Each sequence is cut after `k` tokens and after its first stop id. Per prompt:
    the common prefix (after one different token greedy decoding follows another
    context, so later matches mean nothing) out of the longer of the two.
    """
    if len(ft_tokens) != len(hf_tokens):
        raise ValueError(f"{len(ft_tokens)} ft sequences against {len(hf_tokens)} transformers sequences")

    def cut(tokens: list[int]) -> list[int]:
        tokens = list(tokens[:k])
        ends = [i for i, t in enumerate(tokens) if t in stop_ids]
        return tokens[: ends[0] + 1] if ends else tokens

    prefixes, compared = [], []
    for a, b in zip(map(cut, ft_tokens), map(cut, hf_tokens)):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefixes.append(n)
        compared.append(max(len(a), len(b)))
    return {
        "tokens_compared": k,
        "agreed_prefix": prefixes,
        "compared": compared,
        "prompts_fully_agreeing": sum(p == c for p, c in zip(prefixes, compared)),
        "num_prompts": len(prefixes),
        "fraction": sum(prefixes) / max(sum(compared), 1),
    }


def agreement_check(model, hf, tokenizer, test_path: Path, modes: list[str], args) -> dict[str, Any]:
    """Greedy tokens of ft (each mode) against transformers' default cache on GSM8K test
    prompts, all in one left-padded batch each, stopping on the tokenizer's stop ids."""
    from ft.data import read_prompts

    rows = read_prompts(test_path, tokenizer, format="gsm8k")[: args.agree_prompts]
    prompts = [row.prompt_tokens for row in rows]
    K, stop_ids = args.agree_tokens, list(tokenizer.stop_ids)
    device = model.model.embed_tokens.weight.device
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    T = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        out = hf.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=K, num_beams=1,
                          eos_token_id=stop_ids, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    hf_tokens = out[:, T:].tolist()
    report: dict[str, Any] = {"prompts": len(prompts), "tokens": K, "per_mode": {},
                              "example": {"prompt": rows[0].prompt_text, "transformers": tokenizer.decode(
                                  [t for t in hf_tokens[0] if t != pad])}}
    for mode in modes:
        generator = ft_generator(model, tokenizer, mode, max_gen_len=K, batch_size=len(prompts), stop_ids=stop_ids)
        outputs = generator(prompts)
        report["per_mode"][f"ft/{mode}"] = greedy_agreement([o.tokens for o in outputs], hf_tokens, k=K,
                                                            stop_ids=set(stop_ids))
        report["example"][f"ft/{mode}"] = outputs[0].text
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.hbm_tb_s is None:
        args.hbm_tb_s = datasheet_hbm_tb_s(device)
    arch = args.arch or ("llama_debug" if args.tiny else "llama3_2_1b")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    modes = args.ft_modes or (["cuda_graph", "compile"] if device.type == "cuda" else ["eager"])

    # Many shapes through one compiled decode step (batch sizes, modes, the agreement batch).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    config = find_arch(arch)[1]
    tokenizer = training = None
    if args.train_steps:
        from train_throughput import train_gsm8k_tokenizer

        train_path, test_path = gsm8k_paths(args)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = train_gsm8k_tokenizer(train_path, Path(tmp), vocab_size=args.tokenizer_vocab)
        if tokenizer.vocab_size > config.vocab_size:  # a debug arch: room for the tokenizer's pieces
            config = dataclasses.replace(config, vocab_size=-(-tokenizer.vocab_size // 64) * 64)
        model = build_model(config, device=device, dtype=torch.float32, seed=args.seed)
        training = train_on_gsm8k(model, tokenizer, train_path, args, device)
        model = model.to(dtype).eval()
        _free(device)
        print(f"trained: {json.dumps({k: v for k, v in training.items() if k != 'loss_curve'})}", file=sys.stderr)
    else:
        model = build_model(config, device=device, dtype=dtype, seed=args.seed).eval()
    gen = torch.Generator().manual_seed(args.seed)
    prompts = {
        B: torch.randint(0, model.config.vocab_size, (B, args.prompt_len), generator=gen) for B in args.batch_sizes
    }
    results = []
    for B in args.batch_sizes:
        for mode in modes:
            results.append(bench_ft(model, prompts[B], mode, args, device))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)

    errors: dict[str, str] = {}
    agreement = None
    if args.hf_caches:
        try:
            hf = build_hf_model(model, dtype, device)
        except Exception as error:  # transformers missing or incompatible: still report ft's numbers
            errors["transformers"] = f"{type(error).__name__}: {error}"
            hf = None
        if hf is not None:
            for B in args.batch_sizes:
                for cache in args.hf_caches:
                    try:
                        results.append(bench_hf(hf, prompts[B], cache, args, device))
                        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
                    except Exception as error:
                        errors[f"transformers {cache} cache, batch {B}"] = f"{type(error).__name__}: {error}"
            if tokenizer is not None:
                try:
                    agreement = agreement_check(model, hf, tokenizer, test_path, args.agree_modes or modes, args)
                except Exception as error:
                    errors["agreement"] = f"{type(error).__name__}: {error}"

    summary = {}
    for B in args.batch_sizes:
        row = {f"{r['impl']}/{r['mode']}": round(r["tokens_per_s"], 1) for r in results if r["batch_size"] == B}
        best_ft = max((v for k, v in row.items() if k.startswith("ft/")), default=None)
        for base in ("transformers/static_cache", "transformers/dynamic_cache"):
            if best_ft is not None and row.get(base):
                row[f"best ft / {base}"] = round(best_ft / row[base], 2)
        # Same weights, same greedy rule: the first tokens should agree (bf16 rounding may
        # let long continuations drift apart, so only the first 8 of 2 rows are compared).
        firsts = {f"{r['impl']}/{r['mode']}": r["first_tokens"] for r in results if r["batch_size"] == B}
        if "transformers/dynamic_cache" in firsts:
            reference = firsts["transformers/dynamic_cache"]
            row["first_tokens_agree"] = {k: v == reference for k, v in firsts.items() if k.startswith("ft/")}
        fractions = {f"ft/{r['mode']}": round(r["hbm_fraction"], 3) for r in results
                     if r["batch_size"] == B and r.get("hbm_fraction") is not None}
        if fractions:
            row["ft hbm_fraction per decode step"] = fractions
        summary[f"batch_{B}"] = row

    report = {
        "benchmark": "generate_throughput",
        "arch": arch,
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "hbm_tb_s": args.hbm_tb_s,
        "versions": {"torch": torch.__version__, "transformers": _transformers_version(), "python": platform.python_version()},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "weights": "random" if training is None else "trained on GSM8K",
        "training": training,
        "greedy_agreement": agreement,
        "summary_tokens_per_s": summary,
        "results": results,
        "errors": errors,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


if __name__ == "__main__":
    sys.exit(main())
