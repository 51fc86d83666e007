"""Whether concatenating a layer's q/k/v and gate/up weights at each training step pays:
one decoder layer's input projections, forward and backward, compiled, with the
projections as separate matmuls (ft's training layout) against one matmul over weights
concatenated in the step (the copy of the weights and the split of their gradients counted).

    python3 benchmarks/projection_fusion.py --out projection_fusion.json

Shapes: llama3_2_1b at 8 x 2048 tokens and llama3_1_8b at 4 x 2048, bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {  # tokens, dim, q out, k/v out, ffn
    "llama3_2_1b": (16384, 2048, 2048, 512, 8192),
    "llama3_1_8b": (8192, 4096, 4096, 1024, 14336),
}


def separate(x, wq, wk, wv, wg, wu):
    q, k, v = F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)
    return q, k, v, F.silu(F.linear(x, wg)) * F.linear(x, wu)


def concatenated(x, wq, wk, wv, wg, wu):
    q, k, v = F.linear(x, torch.cat([wq, wk, wv])).split([wq.shape[0], wk.shape[0], wv.shape[0]], dim=-1)
    gate, up = F.linear(x, torch.cat([wg, wu])).chunk(2, dim=-1)
    return q, k, v, F.silu(gate) * up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(SHAPES))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    results = []
    for arch in args.archs:
        tokens, dim, q_out, kv_out, ffn = SHAPES[arch]

        def rand(*shape, scale=0.02):
            return (scale * torch.randn(*shape, device=device, generator=gen)).to(torch.bfloat16)

        x = rand(tokens, dim, scale=1.0).requires_grad_()
        weights = [rand(q_out, dim), rand(kv_out, dim), rand(kv_out, dim), rand(ffn, dim), rand(ffn, dim)]
        weights = [w.requires_grad_() for w in weights]
        upstream = [rand(tokens, n, scale=1.0) for n in (q_out, kv_out, kv_out, ffn)]
        for name, fn in (("separate", separate), ("concatenated", concatenated)):
            compiled = torch.compile(fn)

            def step():
                for t in (x, *weights):
                    t.grad = None
                torch.autograd.backward(compiled(x, *weights), upstream)

            timing = common.cuda_timed(step, warmup=args.warmup, steps=args.steps)
            row = {"arch": arch, "variant": name, **timing}
            results.append(row)
            print(json.dumps(row), flush=True)
        sep, cat = (next(r["median_ms"] for r in results if r["arch"] == arch and r["variant"] == v)
                    for v in ("separate", "concatenated"))
        print(f"{arch}: separate {sep:.3f} ms, concatenated {cat:.3f} ms a layer ({sep - cat:+.3f})", flush=True)
        del x, weights, upstream
    if args.out:
        args.out.write_text(json.dumps({"environment": common.environment(device), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
