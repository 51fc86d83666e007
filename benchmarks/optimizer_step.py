"""How fast the optimizer's part of a training step runs on one GPU: the global
gradient norm and the AdamW update over a model's parameters (their real shapes,
random values), against the card's own read/write bandwidth.

    python3 benchmarks/optimizer_step.py --arch llama3_2_1b --out opt.json

Variants (each timed over several steps, CUDA events around each):
- `norm`: the global gradient norm alone (`torch.nn.utils.get_total_norm`, foreach);
- `fused`: torch's fused AdamW step alone; `fused_clip_folded`: the norm, then the
  fused step dividing each gradient by 1/clip-factor (`grad_scale`): what ft runs;
- `foreach_clip`: the norm, a pass multiplying the gradients by the factor, and
  torch's foreach AdamW (what `clip_grad_norm_` + a non-fused AdamW costs);
- `compiled_clip_folded`: the norm, then `ft.training.compiled_adamw`'s step (the same
  update rule, compiled by inductor, the factor folded in).

The floor is the bytes the update must move (parameter, gradient and both moments
read, parameter and moments written) at the `copy` bandwidth measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from ft.models import find_arch  # noqa: E402
from ft.models.build import build_meta_model  # noqa: E402
from ft.training.optim import clip_coefficient  # noqa: E402

GiB = common.GiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama3_2_1b")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--variants", nargs="+",
                        default=["norm", "fused", "fused_clip_folded", "foreach_clip", "compiled_clip_folded"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)

    meta = build_meta_model(find_arch(args.arch)[1], dtype)
    shapes = [p.shape for p in meta.parameters()]
    numel = sum(s.numel() for s in shapes)
    gen = torch.Generator(device=device).manual_seed(0)

    def fresh_params() -> list[torch.nn.Parameter]:
        params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype, generator=gen) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, device=device, dtype=dtype, generator=gen) * 1e-3
        return params

    element = torch.finfo(dtype).bits // 8
    floor_bytes = numel * element * 7  # read p, g, m, v; write p, m, v
    bandwidth = common.copy_bandwidth(device)
    report = {"benchmark": "optimizer_step", "arch": args.arch, "dtype": args.dtype, "parameters": numel,
              "tensors": len(shapes), "environment": common.environment(device),
              "copy_bandwidth_tb_s": bandwidth / 1e12, "floor_ms": floor_bytes / bandwidth * 1e3, "results": {}}
    print(f"{args.arch}: {numel / 1e9:.3f}B parameters in {len(shapes)} tensors, {args.dtype}; copy "
          f"{bandwidth / 1e12:.2f} TB/s, update floor {report['floor_ms']:.2f} ms", flush=True)

    kw = {"lr": 1e-5, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    for name in args.variants:
        params = fresh_params()
        grads = [p.grad for p in params]
        if name == "norm":
            def fn():
                torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        elif name in ("fused", "fused_clip_folded"):
            opt = torch.optim.AdamW(params, fused=True, **kw)

            def fn(opt=opt, fold=name == "fused_clip_folded"):
                if fold:
                    norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
                    opt.grad_scale = 1.0 / clip_coefficient(norm, 1.0)
                opt.step()
        elif name == "foreach_clip":
            opt = torch.optim.AdamW(params, foreach=True, **kw)

            def fn(opt=opt):
                norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
                torch._foreach_mul_(grads, clip_coefficient(norm, 1.0).to(dtype))
                opt.step()
        elif name == "compiled_clip_folded":
            from ft.training.compiled_adamw import CompiledAdamW

            opt = CompiledAdamW(params, **kw)

            def fn(opt=opt):
                norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
                opt.grad_scale = 1.0 / clip_coefficient(norm, 1.0)
                opt.step()
        else:
            raise SystemExit(f"unknown variant {name}")
        t0 = time.perf_counter()
        fn()  # first call: compiles where it compiles
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        result = common.cuda_timed(fn, warmup=args.warmup, steps=args.steps)
        moved = numel * element * (1 if name == "norm" else 7)
        result.update(first_call_s=first_s, tb_s=moved / (result["median_ms"] / 1e3) / 1e12)
        report["results"][name] = result
        print(f"  {name:<22} {result['median_ms']:7.2f} ms  ({result['tb_s']:.2f} TB/s of its own bytes; "
              f"first call {first_s:.1f} s)", flush=True)
        del params, grads, fn
        torch.cuda.empty_cache()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
