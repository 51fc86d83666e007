"""How fast one-row matmuls (a batch-1 decoding step's linears) read their weights:
cuBLAS (`F.linear`), inductor's coordinate-descent-tuned reduction (what a compiled
batch-1 step of ft runs), and a plain Triton one-row kernel at several tile shapes,
each on the llama3_2_1b shapes, against the card's own read bandwidth (a `sum` over
2 GiB) and its datasheet.

    python3 benchmarks/one_row_matmul.py --out one_row.json

Each shape is timed on 16 distinct weights (one per layer, as in the model, so the
L2 cache does not hold them) replayed from one CUDA graph, so launch gaps inside a
graph count as in a real step. "model" times the whole step's matmuls in order
(16 layers of q/k/v, o, gate/up and down, then the output projection).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DATASHEET_TBPS = {"H100": 3.35, "H200": 4.8}
SHAPES = {  # (rows of the weight N, input size K) of llama3_2_1b's projections, q/k/v and gate/up fused
    "qkv": (3072, 2048),
    "o": (2048, 2048),
    "gate_up": (16384, 2048),
    "down": (2048, 8192),
    "output": (128256, 2048),
}
LAYERS = 16
CONFIGS = [(bn, bk, w) for bn in (1, 2, 4, 8, 16) for bk in (256, 512, 1024) for w in (2, 4, 8)]


def triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def one_row(x_ptr, w_ptr, y_ptr, N, stride_wn, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in tl.static_range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < K),
                        other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * x[None, :]
        tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)

    def run(x, w, y, block_n, block_k, warps):
        N, K = w.shape
        one_row[(triton.cdiv(N, block_n),)](x, w, y, N, w.stride(0), K=K, BLOCK_N=block_n, BLOCK_K=block_k,
                                            num_warps=warps)
        return y

    return run


def time_graph(fn, repeats: int = 30) -> float:
    """Seconds per call of `fn` (a list of kernels) replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    datasheet = next((v for k, v in DATASHEET_TBPS.items() if k in name), None)
    result: dict = {"device": name, "torch": torch.__version__, "datasheet_TBps": datasheet, "shapes": {}}

    def save():
        args.out.write_text(json.dumps(result, indent=1))

    big = torch.randn(1024, 1024, 1024, device=dev, dtype=torch.bfloat16)  # 2 GiB
    read_s = time_graph(lambda: big.sum(), repeats=20)
    result["read_TBps_sum"] = big.numel() * 2 / read_s / 1e12
    print(f"{name}: sum over 2 GiB reads at {result['read_TBps_sum']:.2f} TB/s (datasheet {datasheet})", flush=True)
    del big
    run_triton = triton_kernel()
    compiled = torch.compile(lambda x, w: F.linear(x, w), dynamic=False, options={"coordinate_descent_tuning": True})
    best_triton: dict[str, tuple[int, int, int]] = {}
    for shape_name, (N, K) in SHAPES.items():
        count = 1 if shape_name == "output" else LAYERS
        weights = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K**0.5 for _ in range(count)]
        x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
        ys = [torch.empty(1, N, device=dev, dtype=torch.bfloat16) for _ in range(count)]
        reference = F.linear(x.float(), weights[0].float())
        bytes_read = count * N * K * 2
        rows: dict[str, dict] = {}

        def record(label, fn, y_of):
            seconds = time_graph(fn)
            error = (y_of().float() - reference).abs().max().item()
            rows[label] = dict(us=seconds * 1e6 / count, TBps=bytes_read / seconds / 1e12, max_abs_error=error)

        record("cublas", lambda: [F.linear(x, w, out=y) for w, y in zip(weights, ys)], lambda: ys[0])
        compiled_out: list = [None]

        def run_compiled():
            compiled_out[0] = [compiled(x, w) for w in weights]
        record("inductor_cdt", run_compiled, lambda: compiled_out[0][0])
        for bn, bk, warps in CONFIGS:
            if bk > K:
                continue
            try:
                record(f"triton_n{bn}_k{bk}_w{warps}",
                       lambda: [run_triton(x, w, y, bn, bk, warps) for w, y in zip(weights, ys)], lambda: ys[0])
            except Exception as error:  # a tile that does not compile (registers) is just skipped
                rows[f"triton_n{bn}_k{bk}_w{warps}"] = dict(error=f"{type(error).__name__}: {error}"[:200])
        tritons = {k: v for k, v in rows.items() if k.startswith("triton") and "us" in v}
        best = min(tritons, key=lambda k: tritons[k]["us"])
        best_triton[shape_name] = tuple(int(p[1:]) for p in best.split("_")[1:])
        result["shapes"][shape_name] = dict(N=N, K=K, best_triton=best, variants=rows)
        print(f"{shape_name} [{N}x{K}]: cublas {rows['cublas']['us']:.1f} us ({rows['cublas']['TBps']:.2f} TB/s), "
              f"inductor_cdt {rows['inductor_cdt']['us']:.1f} us ({rows['inductor_cdt']['TBps']:.2f}), "
              f"{best} {tritons[best]['us']:.1f} us ({tritons[best]['TBps']:.2f}), "
              f"err {tritons[best]['max_abs_error']:.2e}", flush=True)
        save()
        del weights, ys

    # The whole step's matmuls in order, each way.
    layers = [{s: torch.randn(*SHAPES[s], device=dev, dtype=torch.bfloat16) for s in ("qkv", "o", "gate_up", "down")}
              for _ in range(LAYERS)]
    output = torch.randn(*SHAPES["output"], device=dev, dtype=torch.bfloat16)
    xs = {s: torch.randn(1, K, device=dev, dtype=torch.bfloat16) for s, (_, K) in SHAPES.items()}
    ys = {s: torch.empty(1, N, device=dev, dtype=torch.bfloat16) for s, (N, _) in SHAPES.items()}
    total_bytes = (sum(w.numel() for layer in layers for w in layer.values()) + output.numel()) * 2

    def model_step(linear):
        for layer in layers:
            for s, w in layer.items():
                linear(s, w)
        linear("output", output)

    ways = {
        "cublas": lambda s, w: F.linear(xs[s], w, out=ys[s]),
        "inductor_cdt": lambda s, w: compiled(xs[s], w),
        "triton_best": lambda s, w: run_triton(xs[s], w, ys[s], *best_triton[s]),
    }
    result["model"] = {}
    for label, linear in ways.items():
        seconds = time_graph(lambda: model_step(linear))
        result["model"][label] = dict(ms=seconds * 1e3, TBps=total_bytes / seconds / 1e12)
        print(f"model step matmuls, {label}: {seconds * 1e3:.3f} ms ({total_bytes / seconds / 1e12:.2f} TB/s)", flush=True)
    result["model_bytes"] = total_bytes
    save()
    del layers, output
    result["attention"] = attention_splits(dev)
    save()
    result["pick"] = pick_alone(dev)
    save()


def attention_splits(dev) -> dict:
    """ft's split-KV decoding attention at batch 1 (llama3_2_1b: 8 KV heads of 4 query
    heads, head size 64) over windows of S keys: as `num_splits_for` chooses, against one
    direct pass and fixed split sizes, 16 layers' caches in one graph."""
    from ft.models import decode_attention as attention

    rows = {}
    chosen = attention.num_splits_for
    for S in (128, 192, 256, 384, 512, 1024, 2048, 4096):
        q = torch.randn(1, 32, 1, 64, device=dev, dtype=torch.bfloat16)
        caches = [(torch.randn(1, 8, S, 64, device=dev, dtype=torch.bfloat16),
                   torch.randn(1, 8, S, 64, device=dev, dtype=torch.bfloat16)) for _ in range(LAYERS)]
        allowed = torch.ones(1, S, device=dev, dtype=torch.bool)
        row = {}
        splitters = {"chosen": chosen, "direct": lambda bk, n, want: (1, -(-n // 64) * 64)}
        for per_split in (64, 128, 256, 512, 1024):
            if per_split < S:
                splitters[f"keys_per_split_{per_split}"] = lambda bk, n, want, p=per_split: (-(-n // p), p)
        for label, splitter in splitters.items():
            attention.num_splits_for = splitter
            try:
                seconds = time_graph(lambda: [attention._triton_decode_attention(q, k, v, allowed) for k, v in caches])
            finally:
                attention.num_splits_for = chosen
            row[label] = seconds * 1e6 / LAYERS
        row["chosen_splits"] = chosen(8, S, attention._programs_wanted(dev.index or 0))[0]
        rows[S] = row
        print(f"attention, batch 1, {S} keys, us a layer: " + ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    return rows


def pick_alone(dev) -> dict:
    """The greedy pick and its log-probability over a 128k vocabulary at batch 1, compiled
    on its own (bf16 logits in memory): what it costs when not fused into the output matmul."""
    from ft.generation import sampling

    logits = torch.randn(1, 128256, device=dev, dtype=torch.bfloat16)
    result = {}
    for label, parallelism in (("one_stage", 1), ("chunked", sampling.PICK_PARALLELISM)):
        torch._dynamo.reset()
        default, sampling.PICK_PARALLELISM = sampling.PICK_PARALLELISM, parallelism
        try:
            pick = torch.compile(sampling.greedy_and_logprobs, dynamic=False)
            seconds = time_graph(lambda: [pick(logits) for _ in range(16)])
        finally:
            sampling.PICK_PARALLELISM = default
        result[label] = seconds * 1e6 / 16
        print(f"greedy pick over 128256 logits alone, {label}: {result[label]:.2f} us", flush=True)
    return result


if __name__ == "__main__":
    main()
