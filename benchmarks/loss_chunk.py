"""How fast a loss chunk's softmax gradient runs on one GPU: ft's Triton kernel
(`ft.training.cross_entropy_kernel`) at several tile sizes, warps and programs per SM,
against the inductor-compiled expression the fused loss ran before it, on bf16 logits of
a chunk of rows x a vocabulary.

    python3 benchmarks/loss_chunk.py --rows 1024 16384 --vocab 128256 --out loss_chunk.json

Each variant reads the logits and writes the gradient (the kernel over them in place, the
compiled expression into a new buffer, as its own graph cannot reuse an input). The floor
is one read and one write at the `copy` bandwidth measured here; the compiled expression
reads each row twice from memory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from ft.training import cross_entropy_kernel  # noqa: E402


def compiled_expression():
    """The chunk's loss and gradient as `ft.training.loss._chunk_loss_and_grads` writes them,
    from given logits."""

    def loss_and_grad(logits_CV: torch.Tensor, labels_C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lse_C = torch.logsumexp(logits_CV.float(), dim=-1)
        loss = (lse_C - logits_CV.gather(1, labels_C[:, None]).squeeze(1).float()).sum()
        is_label_CV = torch.arange(logits_CV.shape[1], device=labels_C.device)[None, :] == labels_C[:, None]
        grad = (torch.exp(logits_CV.float() - lse_C[:, None]) - is_label_CV.float()).to(logits_CV.dtype)
        return loss, grad

    return torch.compile(loss_and_grad, dynamic=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1024, 16384])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--blocks", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--warps", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--programs-per-sm", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    bandwidth = common.copy_bandwidth(device)
    compiled = compiled_expression()
    gen = torch.Generator(device=device).manual_seed(0)
    results: list[dict] = []
    for rows in args.rows:
        source = (4 * torch.randn(rows, args.vocab, device=device, generator=gen)).to(torch.bfloat16)
        labels = torch.randint(0, args.vocab, (rows,), device=device, generator=gen)
        logits = torch.empty_like(source)
        floor_ms = 2 * source.numel() * source.element_size() / bandwidth * 1e3
        want_loss, want_grad = compiled(source, labels)

        def report(name: str, timing: dict, **settings) -> None:
            row = {"rows": rows, "vocab": args.vocab, "variant": name, **settings, **timing,
                   "floor_ms": floor_ms, "of_floor": floor_ms / timing["median_ms"]}
            results.append(row)
            print(json.dumps(row), flush=True)

        # The refill of the logits between runs is outside the timed call of each variant.
        report("compiled", common.cuda_timed(lambda: compiled(source, labels), warmup=args.warmup,
                                             steps=args.steps))
        for block, warps, per_sm in itertools.product(args.blocks, args.warps, args.programs_per_sm):
            settings = {"block": block, "num_warps": warps, "programs_per_sm": per_sm}
            logits.copy_(source)
            loss = cross_entropy_kernel.softmax_gradient_(logits, labels, **settings).sum()
            torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-2)
            torch.testing.assert_close(logits, want_grad, rtol=1.6e-2, atol=1e-4)
            times = []
            for step in range(args.warmup + args.steps):
                logits.copy_(source)
                timing = common.cuda_timed(lambda: cross_entropy_kernel.softmax_gradient_(logits, labels, **settings),
                                           warmup=0, steps=1)
                if step >= args.warmup:
                    times.append(timing["median_ms"])
            times.sort()
            report("triton", {"median_ms": times[len(times) // 2], "min_ms": times[0]}, **settings)
        best = min((r for r in results if r["rows"] == rows and r["variant"] == "triton"),
                   key=lambda r: r["median_ms"])
        compiled_ms = next(r["median_ms"] for r in results if r["rows"] == rows and r["variant"] == "compiled")
        print(f"rows {rows}: compiled {compiled_ms:.3f} ms, best kernel {best['median_ms']:.3f} ms "
              f"(block {best['block']}, {best['num_warps']} warps, {best['programs_per_sm']}/SM), "
              f"floor {floor_ms:.3f} ms", flush=True)
        del source, logits, want_grad
    if args.out:
        args.out.write_text(json.dumps({"environment": common.environment(device), "copy_bytes_per_s": bandwidth,
                                        "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
