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
a CUDA graph) and "compile" (torch.compile'd decode step inside the CUDA graph);
the JSON says which path actually ran (a failed compile or capture falls back).

Memory-bandwidth use of ft's decode step: a prefill-only call (one new token) is
timed too, and `decode_step_s` = (whole call - prefill call) / (new tokens - 1).
A step must read every weight once (the embedding table only as the tied output
projection) plus the keys and values attention spans (the filled slots rounded up
to the cache's window bucket); `hbm_fraction` = those bytes / step time / `--hbm-tb-s`
(4.8 TB/s: H200). Launch overhead, sampling and the host loop count as step time.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ft.generation import GenerateStats, Generator, GeneratorConfig, StaticKVCache
from ft.models import build_model
from ft.models import family_of


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
    parser.add_argument("--ft-modes", nargs="+", default=None, choices=["eager", "cuda_graph", "compile"],
                        help="default: cuda_graph and compile on CUDA, eager elsewhere")
    parser.add_argument("--hf-caches", nargs="*", default=["dynamic", "static"], choices=["dynamic", "static"],
                        help="transformers cache implementations to compare against (none: skip transformers)")
    parser.add_argument("--hbm-tb-s", type=float, default=4.8, help="memory bandwidth for hbm_fraction (H200: 4.8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    return parser.parse_args(argv)


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


def bench_ft(model, prompts_BT: torch.Tensor, mode: str, args, device) -> dict[str, Any]:
    B = prompts_BT.shape[0]
    config = GeneratorConfig(
        greedy=True, max_gen_len=args.new_tokens, batch_size=B,
        cuda_graphs=mode in ("cuda_graph", "compile"), compile=mode == "compile",
    )
    generator = Generator(model, _NoTextTokenizer(), config, stop_ids=())
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
        prefill = Generator(model, _NoTextTokenizer(), dataclasses.replace(config, max_gen_len=1), stop_ids=())
        prefill_s, _ = _time_best(lambda: prefill(prompts), repeats=args.repeats, device=device)
        del prefill
        result.update(decode_bandwidth(model, B, args, seconds=seconds, prefill_s=prefill_s))
    _free(device)
    return result


def decode_bytes_per_step(model, batch_size: int, prompt_len: int, new_tokens: int) -> tuple[int, float]:
    """(weight bytes, mean KV bytes) one decode step reads, with the generator's cache
    layout: its max_len (a multiple of 16) and its window buckets."""
    params = {id(p): p for p in model.parameters()}  # a tied weight once
    weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
    embed = model.model.embed_tokens.weight
    if not model.config.tie_embeddings:  # the embedding table is only indexed, B rows
        weight_bytes -= embed.numel() * embed.element_size()
    max_len = -(-(prompt_len + new_tokens) // 16) * 16
    cache = StaticKVCache(model, batch_size=1, max_len=max_len)
    windows = [cache.window_for(prompt_len + t + 1) for t in range(new_tokens - 1)]  # decode steps 1..N-1
    config = model.config
    kv_per_slot = 2 * config.n_layers * batch_size * config.n_kv_heads * config.head_dim * embed.element_size()
    return weight_bytes, kv_per_slot * sum(windows) / max(len(windows), 1)


def decode_bandwidth(model, batch_size: int, args, *, seconds: float, prefill_s: float) -> dict[str, Any]:
    weight_bytes, kv_bytes = decode_bytes_per_step(model, batch_size, args.prompt_len, args.new_tokens)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    arch = args.arch or ("llama_debug" if args.tiny else "llama3_2_1b")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    modes = args.ft_modes or (["cuda_graph", "compile"] if device.type == "cuda" else ["eager"])

    model = build_model(arch, device=device, dtype=dtype, seed=args.seed).eval()
    gen = torch.Generator().manual_seed(args.seed)
    prompts = {
        B: torch.randint(0, model.config.vocab_size, (B, args.prompt_len), generator=gen) for B in args.batch_sizes
    }
    results = []
    for B in args.batch_sizes:
        for mode in modes:
            results.append(bench_ft(model, prompts[B], mode, args, device))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)

    errors = {}
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
