"""`DecodeStep`: one decoding step (one new token per row) of a model against a
`StaticKVCache`, run eagerly, compiled, and/or replayed from a CUDA graph.

A step of a small model at a small batch is dominated by kernel launches (a 1B
Llama issues hundreds per token); replaying a captured CUDA graph removes that
overhead, and `torch.compile` additionally fuses the elementwise work. Both need
the fixed shapes the static cache provides. Whatever fails (capture, compile)
falls back to the next simpler path with a warning; `path` says which one runs.

Each step attends over the cache's filled slots rounded up to a bucket
(`StaticKVCache.window_for`), not the whole cache: one CUDA graph is captured per
bucket (at most `ft.generation.cache.MAX_BUCKETS`), and the compiled step treats the
window length as a dynamic size, so it compiles once for all of them.

`DecodeStep.greedy(state)` is the greedy loop's step: the forward, the pick of the
most likely token with its log-probability, and the loop's bookkeeping
(`ft.generation.greedy_loop`) as one function, compiled and captured together, so
the host replays one graph per token and launches nothing else.

`DecodeOptions` selects other ways to run the same step, for benchmarks to compare
in one process: the whole cache every step (the path before buckets), one static
compile per bucket, another torch.compile mode (e.g. "max-autotune-no-cudagraphs",
which tunes the skinny matmuls of decoding; ft captures its own graphs, so the
mode must not add cudagraphs), unfused projections (`Generator` fuses them by
default). Every option gives the same logits up to the kernels' rounding.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ft.generation.cache import StaticKVCache
from ft.generation.greedy_loop import GreedyLoopState, record_pick
from ft.generation.sampling import greedy_and_logprobs
from ft.models.decode_attention import triton_usable

log = logging.getLogger("ft")

_WARMUP_STEPS = 3
FLEX = "flex"
SPLIT_KV = "split_kv"
SDPA = "sdpa"
DECODE_KERNELS = (FLEX, SPLIT_KV)  # attention kernels the cache asks for through its mask, not SDPA backends
ONE_ROW_INDUCTOR_OPTIONS = (("coordinate_descent_tuning", True),)


def decode_forward(model: nn.Module, cache: StaticKVCache, tokens_B1: Tensor, positions_B1: Tensor,
                   attention: str | None = None) -> Tensor:
    """The model's logits [B, V] after feeding one token per row into `cache`;
    `attention` names the SDPA backend to use (None: SDPA's own choice)."""
    with _sdpa_backend(attention):
        return model(tokens_B1, positions_BT=positions_B1, kv_cache=cache)[:, -1]


def greedy_decode_forward(model: nn.Module, cache: StaticKVCache, tokens_B1: Tensor, positions_B1: Tensor,
                          done_B: Tensor, lengths_B: Tensor, stop_S: Tensor, tokens_BL: Tensor, logprobs_BL: Tensor,
                          t: Tensor, attention: str | None = None) -> None:
    """One greedy step in place on a `GreedyLoopState`'s tensors (in their field order):
    feed `tokens_B1`, pick the most likely next tokens, record them."""
    logits_BV = decode_forward(model, cache, tokens_B1, positions_B1, attention)
    next_B, logprob_B = greedy_and_logprobs(logits_BV)
    positions_B1.add_(1)
    record_pick(tokens_B1, positions_B1, done_B, lengths_B, stop_S, tokens_BL, logprobs_BL, t, next_B, logprob_B)


def decode_kernel_for(attention: str | None, device: torch.device) -> str | None:
    """The kernel the cache asks for at decoding steps (`StaticKVCache.decode_kernel`):
    by default (None) ft's split-KV kernels where Triton runs them (CUDA), else SDPA."""
    if attention is None:
        # CUDA only: Triton's CPU interpreter (tests) must not make it the CPU default.
        return SPLIT_KV if device.type == "cuda" and triton_usable(device) else None
    return attention if attention in DECODE_KERNELS else None


def _sdpa_backend(name: str | None):
    if name is None or name == SDPA or name in DECODE_KERNELS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name.upper())])


@dataclass(frozen=True)
class DecodeOptions:
    """How `DecodeStep` runs a step (the defaults are what `generate` uses)."""

    windowed: bool = True
    """Attend over the filled slots rounded up to a bucket; False: over the whole cache."""
    dynamic_window: bool = True
    """Compile once with the window length dynamic; False: one static compile per bucket."""
    compile_mode: str | None = None
    """torch.compile's `mode` for the compiled step (None: its default)."""
    fused_projections: bool = True
    """While generating, q/k/v and gate/up projections run as one matmul each on
    concatenated weights (`ft.generation.fused_projections`; prefill too); False: one
    matmul per projection, as the model is built."""
    attention: str | None = None
    """The decode step's attention. None: ft's split-KV kernels on CUDA ("split_kv"),
    SDPA elsewhere; "sdpa": SDPA's own choice of kernel (cuDNN's on Hopper); an SDPA
    backend ("math", "efficient_attention", "cudnn_attention", ...). Compiled, "math" becomes matmuls
    and one fused masked softmax that inductor writes. Instead of SDPA (the cache's
    `decode_kernel`): "flex", FlexAttention's decoding kernel (the key mask as a
    score_mod); "split_kv", ft's split-KV Triton kernels (`ft.models.decode_attention`;
    SDPA off the GPU)."""
    inductor_options: tuple[tuple[str, Any], ...] = ()
    """torch.compile `options` for the compiled step (e.g. (("coordinate_descent_tuning",
    True),)); only without `compile_mode`, which torch.compile does not combine with them."""
    tune_one_row: bool = True
    """A compiled step of one row (batch 1, no beams) with neither a mode nor inductor
    options compiles with inductor's coordinate-descent tuning: its one-row matmuls
    become reductions that inductor writes and tunes (1B shape on an H100: 733 against
    670 tokens/s, for a longer compile); with more rows it changed nothing measurable."""
    pick_in_step: bool = True
    """Greedy decoding: the pick and the loop's bookkeeping run inside the step
    (`DecodeStep.greedy`, one graph per token); False: after it, as separate kernels
    the host launches every token."""


_compiled_decode_forward: dict[tuple[Any, ...], object] = {}


def compiled_decode_forward(mode: str | None = None, dynamic_window: bool = True,
                            inductor_options: tuple[tuple[str, Any], ...] = (), *, fn: Callable = decode_forward):
    """`fn` (`decode_forward` or `greedy_decode_forward`) under torch.compile, made once
    per process, function, mode and window kind: dynamo guards on shapes and dtypes, not on which model or cache, so later
    generators of the same shapes reuse the compiled code instead of compiling again.
    (Each is its own backend, so a static-window step never runs code compiled for a
    dynamic window, nor the other way round.)"""
    key = (fn.__name__, mode, dynamic_window, inductor_options)
    if key not in _compiled_decode_forward:
        if inductor_options and mode is not None:
            raise ValueError(f"torch.compile takes a mode ({mode!r}) or inductor options, not both")
        options = dict(inductor_options) or None
        _compiled_decode_forward[key] = torch.compile(fn, dynamic=False, mode=mode, options=options)
    return _compiled_decode_forward[key]


def _dynamic_window(cache: StaticKVCache) -> StaticKVCache:
    """Mark the window's length dynamic, so every bucket runs the same compiled code."""
    # maybe_: should a model specialize it anyway, each bucket compiles once instead of failing.
    torch._dynamo.maybe_mark_dynamic(cache.window_S, 0)
    return cache


class DecodeStep:
    """`logits_BV = step(tokens_B1, positions_B1)`: the model's logits for the next token
    after feeding one token per row; `step.greedy(state)`: one greedy step written into
    `state`. Either way the cache's slot advances by one.

    The returned tensor of the graph path is a static buffer that the next call
    overwrites: consume it (sample from it) before stepping again. A captured greedy
    graph holds its state's tensors: reuse one `GreedyLoopState` across calls.
    """

    def __init__(self, model: nn.Module, cache: StaticKVCache, *, cuda_graph: bool, compile: bool,
                 options: DecodeOptions = DecodeOptions()) -> None:
        self.model = model
        self.cache = cache
        self.options = options
        cache.decode_kernel = decode_kernel_for(options.attention, cache.valid_BS.device)
        is_cuda = cache.valid_BS.is_cuda
        self.want_graph = cuda_graph and is_cuda
        self.forward = self._eager_forward
        self.greedy_forward = self._eager_greedy_forward
        self.path = "eager"
        if compile:
            dynamic = options.windowed and options.dynamic_window
            inductor_options = options.inductor_options
            if options.tune_one_row and cache.batch_size == 1 and options.compile_mode is None and not inductor_options:
                inductor_options = ONE_ROW_INDUCTOR_OPTIONS
            compiled, compiled_greedy = (
                compiled_decode_forward(options.compile_mode, dynamic, inductor_options, fn=fn)
                for fn in (decode_forward, greedy_decode_forward)
            )
            window_cache = lambda: _dynamic_window(self.cache) if dynamic else self.cache  # noqa: E731
            self.forward = lambda tokens_B1, positions_B1: compiled(
                self.model, window_cache(), tokens_B1, positions_B1, options.attention)
            self.greedy_forward = lambda state: compiled_greedy(
                self.model, window_cache(), *state.tensors(), options.attention)
            self.path = "compile"
        # Per window length: its captured graph and the static logits buffer it writes.
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        # Per window length: the captured greedy step of `self._greedy_state`.
        self.greedy_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._greedy_state: GreedyLoopState | None = None
        self._greedy_windows_run: set[int] = set()
        self._tokens_B1: Tensor | None = None
        self._positions_B1: Tensor | None = None

    def _eager_forward(self, tokens_B1: Tensor, positions_B1: Tensor) -> Tensor:
        return decode_forward(self.model, self.cache, tokens_B1, positions_B1, self.options.attention)

    def _eager_greedy_forward(self, state: GreedyLoopState) -> None:
        greedy_decode_forward(self.model, self.cache, *state.tensors(), self.options.attention)

    def __call__(self, tokens_B1: Tensor, positions_B1: Tensor) -> Tensor:
        window = self._open_window()
        try:
            return self._step(window, tokens_B1, positions_B1)
        finally:
            self.cache.next_slot += 1

    def greedy(self, state: GreedyLoopState) -> None:
        """Feed `state.tokens_B1` at `state.positions_B1`; pick and record the next tokens."""
        window = self._open_window()
        try:
            self._greedy_step(window, state)
        finally:
            self.cache.next_slot += 1

    def _open_window(self) -> int:
        cache = self.cache
        window = cache.window_for(cache.next_slot + 1) if self.options.windowed else cache.max_len
        cache.set_window(window)
        return window

    def _step(self, window: int, tokens_B1: Tensor, positions_B1: Tensor) -> Tensor:
        if self.want_graph and window not in self.graphs:
            self._capture_logits(window, tokens_B1, positions_B1)
        if window in self.graphs:
            assert self._tokens_B1 is not None and self._positions_B1 is not None
            graph, logits_BV = self.graphs[window]
            self._tokens_B1.copy_(tokens_B1)
            self._positions_B1.copy_(positions_B1)
            graph.replay()
            return logits_BV
        return self._run_with_fallback(lambda: self.forward(tokens_B1, positions_B1), [])

    def _greedy_step(self, window: int, state: GreedyLoopState) -> None:
        if state is not self._greedy_state:
            self.greedy_graphs.clear()  # they hold another state's tensors
            self._greedy_state = state
        if self.want_graph and window not in self.greedy_graphs:
            captured = self._capture(lambda: self.greedy_forward(state), state.tensors())
            if captured is not None:
                self.greedy_graphs[window] = captured[0]
        if window in self.greedy_graphs:
            self.greedy_graphs[window].replay()
            return
        # A window's first compiled call is the one that compiles (and may fail): only
        # then is the state worth saving (a copy of every tensor each step otherwise).
        first = window not in self._greedy_windows_run
        self._greedy_windows_run.add(window)
        self._run_with_fallback(lambda: self.greedy_forward(state), state.tensors() if first else ())

    def _run_with_fallback(self, run: Callable[[], Any], mutated: tuple[Tensor, ...] | list[Tensor]) -> Any:
        """`run()` on the compiled path; eagerly, with the cache's slot and the tensors
        `run` writes put back first, once compiling has failed."""
        if self.path == "eager":
            return run()
        saved = [t.clone() for t in (self.cache.slot, *mutated)]
        try:
            return run()
        except Exception as error:  # e.g. no compiler toolchain on this machine
            log.warning("the compiled decode step failed, decoding eagerly: %s", error)
            for tensor, value in zip((self.cache.slot, *mutated), saved):
                tensor.copy_(value)
            self.forward, self.greedy_forward, self.path = self._eager_forward, self._eager_greedy_forward, "eager"
            return run()

    def _capture_logits(self, window: int, tokens_B1: Tensor, positions_B1: Tensor) -> None:
        if self._tokens_B1 is None or self._positions_B1 is None:
            self._tokens_B1, self._positions_B1 = tokens_B1.clone(), positions_B1.clone()
        self._tokens_B1.copy_(tokens_B1)
        self._positions_B1.copy_(positions_B1)
        static_tokens_B1, static_positions_B1 = self._tokens_B1, self._positions_B1
        captured = self._capture(lambda: self.forward(static_tokens_B1, static_positions_B1), ())
        if captured is not None:
            self.graphs[window] = captured

    def _capture(self, run: Callable[[], Any], mutated: tuple[Tensor, ...]) -> tuple[torch.cuda.CUDAGraph, Any] | None:
        """Warm `run` up on a side stream, then capture one call into a CUDA graph:
        (graph, what the captured call returned), or None when capturing failed.

        Warm-up steps write keys at the current slot, which the real step overwrites
        next; the slot and the tensors `run` writes (`mutated`) are put back after
        each, so the cache and the loop's state are left as they were.
        """
        tensors = (self.cache.slot, *mutated)
        saved = [t.clone() for t in tensors]

        def put_back() -> None:
            for tensor, value in zip(tensors, saved):
                tensor.copy_(value)

        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(_WARMUP_STEPS):
                    self._run_with_fallback(run, mutated)
                    put_back()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = run()
            if not self.path.endswith("+cuda_graph"):
                self.path = f"{self.path}+cuda_graph"
            return graph, output
        except Exception as error:
            log.warning("capturing the decode step as a CUDA graph failed, running it without: %s", error)
            self.want_graph = False  # no more attempts
            return None
        finally:
            put_back()
