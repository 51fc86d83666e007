"""Where a decoding step's time goes: ft's generator on a llama3_2_1b-shaped model
(random bf16 weights) at one batch size, profiled with torch.profiler.

    python3 benchmarks/profile_decode.py --batch-size 64 --out prof.txt

CUDA graphs are off here so the profiler sees each kernel; the compiled step is on.
`--full-cache` attends over the whole cache every step (the path before window
buckets), `--compile-mode` compiles the step in another torch.compile mode (e.g.
max-autotune-no-cudagraphs): see `ft.generation.DecodeOptions`.

    python3 benchmarks/profile_decode.py --batch-size 1 --compile-mode max-autotune-no-cudagraphs --out prof_b1.txt

It also times the captured decode graph replayed alone (the GPU's time per step,
without the host loop or sampling between steps) and counts the kernels of one
step (the profiled call's kernels over its steps, the prefill's among them).
`--attention math`, `--inductor-option coordinate_descent_tuning=True` and
`--pick-outside` (greedy picking after the step, not inside it) try the decode
step's other `DecodeOptions`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from ft.generation import DecodeOptions, Generator, GeneratorConfig  # noqa: E402
from ft.models import build_model  # noqa: E402


class _Tokenizer:
    stop_ids: list[int] = []
    bos_id, eos_id, pad_id = 1, 2, None

    def decode(self, ids, skip_special_tokens=True):
        return ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--arch", default="llama3_2_1b")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test (no graphs, float32)")
    parser.add_argument("--full-cache", action="store_true", help="attend over the whole cache every step")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode of the decode step")
    parser.add_argument("--attention", default=None, help="SDPA backend of the decode step (e.g. math)")
    parser.add_argument("--inductor-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a torch.compile option of the decode step (repeatable)")
    parser.add_argument("--pick-outside", action="store_true", help="greedy picking after the step, not inside it")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    inductor_options = tuple((key, _literal(value)) for key, value in (o.split("=", 1) for o in args.inductor_option))
    options = DecodeOptions(windowed=not args.full_cache, compile_mode=args.compile_mode, attention=args.attention,
                            inductor_options=inductor_options, pick_in_step=not args.pick_outside)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.arch, device=device, dtype=dtype, seed=0).eval()
    prompts = torch.randint(0, model.config.vocab_size, (args.batch_size, args.prompt_len)).tolist()
    lines: list[str] = []

    def report(line: str) -> None:  # as it comes, so that a later failure keeps it
        lines.append(line)
        print(line, flush=True)
        args.out.write_text("\n".join(lines) + "\n")

    report(f"batch {args.batch_size}, {args.prompt_len} + {args.new_tokens} tokens, {options}")
    for graphs in (True, False):
        config = GeneratorConfig(greedy=True, max_gen_len=args.new_tokens, batch_size=args.batch_size,
                                 cuda_graphs=graphs, compile=True)
        generator = Generator(model, _Tokenizer(), config, stop_ids=(), decode_options=options)
        generator(prompts)  # warm-up: compile, capture
        _sync(device)
        start = time.perf_counter()
        generator(prompts)
        _sync(device)
        seconds = time.perf_counter() - start
        report(f"cuda_graphs={graphs}: {args.batch_size * args.new_tokens / seconds:,.0f} tokens/s "
                     f"({seconds / args.new_tokens * 1e3:.2f} ms per step incl. prefill), path {generator._decoder[2].path}")
        if graphs:
            report(_replay_alone(generator))
        else:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                generator(prompts)
                _sync(device)
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy_us = sum(e.device_time_total for e in kernels)
            report(f"kernels per step: {len(kernels) / args.new_tokens:.1f}; GPU busy per step "
                         f"{busy_us / args.new_tokens / 1e3:.3f} ms (prefill among them)")
            report(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=35, max_name_column_width=90))


@torch.inference_mode()  # the cache's tensors are inference tensors
def _replay_alone(generator: Generator, steps: int = 200) -> str:
    """The captured graph of the last window replayed `steps` times, the slot (and the
    greedy step's column) put back before each: one or two tiny kernels more than a
    real step. The greedy graph (forward, pick, bookkeeping) when there is one."""
    _, cache, step = generator._decoder
    graphs = step.greedy_graphs or {window: graph for window, (graph, _) in step.graphs.items()}
    if not graphs:
        return "no graph was captured (not on CUDA, or the capture failed)"
    window, graph = max(graphs.items())
    kind = "greedy step (forward, pick, bookkeeping)" if step.greedy_graphs else "forward"
    state = generator._greedy_state
    put_back = [(cache.slot, cache.slot.clone())]
    if step.greedy_graphs and state is not None:
        state.t.fill_(generator.config.max_gen_len // 2)
        put_back.append((state.t, state.t.clone()))

    def replay() -> None:
        for tensor, value in put_back:
            tensor.copy_(value)
        graph.replay()

    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        replay()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / steps * 1e3
    return f"graph of the {window}-slot window, {kind}, replayed alone: {ms:.3f} ms per step ({generator.config.batch_size / ms * 1e3:,.0f} tokens/s)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _literal(text: str):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


if __name__ == "__main__":
    main()
