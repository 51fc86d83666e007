"""Batched generation with a preallocated KV cache: `Generation`, `Generator` and
`generate(model, tokenizer, prompts, config)` (its `GeneratorConfig` is in
`ft.generation.generator_config`).

Prompts are sorted by length (longest first, so an out-of-memory shows at once and
each batch holds similar lengths), left-padded to the batch's longest prompt and
prefilled in one forward; then one token per row per step, each row stopping on
any stop id or after `max_gen_len` tokens. One `StaticKVCache` sized for the
longest prompt serves every batch (a short last batch is padded with dummy rows),
so on CUDA the decode step is captured once as a graph and replayed.

Results come back in the prompts' order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ft.errors import DataError
from ft.generation.beam import beam_search
from ft.generation.cache import StaticKVCache
from ft.generation.decode_step import DecodeOptions, DecodeStep
from ft.generation.fused_projections import fused_projections
from ft.generation.generator_config import GeneratorConfig
from ft.generation.greedy_loop import GreedyLoopState
from ft.generation.sampling import TokenSampler

log = logging.getLogger("ft")

# How often (in steps) the decode loop checks on the host whether every row is done:
# each check is a device synchronisation, which would stall the GPU every step.
SYNC_EVERY_N_STEPS = 16


@dataclass
class Generation:
    """One prompt's output."""

    prompt_tokens: list[int]
    tokens: list[int]
    """Generated ids; the last is the stop id when finish_reason is "stop"."""
    logprobs: list[float]
    """Log-probability of each generated token under the model (temperature 1, unfiltered)."""
    score: float
    """Sum of `logprobs`; for beam search, the length-normalized beam score."""
    finish_reason: str
    """"stop" (a stop id was generated) or "length" (max_gen_len reached)."""
    text: str
    """The decoded response (without the stop token; after the prompt text when echo_prompt)."""


ProgressCallback = Callable[[int, int], None]  # (prompts finished, tokens generated) since the last call
BatchCallback = Callable[[list[tuple[int, "Generation"]]], None]  # (prompt index, generation) of a finished batch


@dataclass
class GenerateStats:
    """Filled in by `generate(..., stats=...)`: what ran, for logs and benchmarks."""

    decode_path: str = ""
    """How the decode step ran: "eager", "compile", "eager+cuda_graph", "compile+cuda_graph"."""
    num_prompts: int = 0
    num_generated_tokens: int = 0


class Generator:
    """A model, tokenizer and config, ready to answer batches of prompts.

    Keeps its KV cache and decode step (with its captured CUDA graph) between calls
    whose shapes match, so repeated calls (a service, a benchmark) pay the setup once.
    `generate(...)` is the one-shot form. `decode_options` picks another way to run
    the decode step (benchmarks compare them; the default is the one to use).
    """

    def __init__(self, model: nn.Module, tokenizer, config: GeneratorConfig, *, stop_ids: Sequence[int] | None = None,
                 decode_options: DecodeOptions = DecodeOptions()) -> None:
        config.validate()
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.decode_options = decode_options
        self.stop_ids = list(tokenizer.stop_ids if stop_ids is None else stop_ids)
        self.device = model.model.embed_tokens.weight.device
        self._decoder: tuple[tuple[int, int], StaticKVCache, DecodeStep] | None = None
        self._greedy_state: GreedyLoopState | None = None

    def _decoder_for(self, rows: int, max_len: int) -> tuple[StaticKVCache, DecodeStep]:
        if self._decoder is None or self._decoder[0] != (rows, max_len):
            self._decoder = None  # free the old cache before allocating the new one
            cache = StaticKVCache(self.model, batch_size=rows, max_len=max_len)
            step = DecodeStep(self.model, cache, cuda_graph=self.config.cuda_graphs, compile=self.config.compile,
                              options=self.decode_options)
            self._decoder = ((rows, max_len), cache, step)
        return self._decoder[1], self._decoder[2]

    def _greedy_state_for(self, rows: int) -> GreedyLoopState:
        """One state for every batch and call of these shapes: captured greedy graphs hold its tensors."""
        state = self._greedy_state
        if state is None or not state.matches(rows, self.config.max_gen_len, self.stop_ids):
            state = GreedyLoopState.allocate(rows, self.config.max_gen_len, self.stop_ids, self.device)
            self._greedy_state = state
        return state

    @torch.inference_mode()
    def __call__(
        self,
        prompts: Sequence[Sequence[int] | str],
        *,
        progress: ProgressCallback | None = None,
        stats: GenerateStats | None = None,
        on_batch: BatchCallback | None = None,
    ) -> list[Generation]:
        """`on_batch` gets each batch's generations as soon as the batch is done (to write them)."""
        with fused_projections(self.model, enabled=self.decode_options.fused_projections):
            return self._generate(prompts, progress=progress, stats=stats, on_batch=on_batch)

    def _generate(
        self,
        prompts: Sequence[Sequence[int] | str],
        *,
        progress: ProgressCallback | None,
        stats: GenerateStats | None,
        on_batch: BatchCallback | None,
    ) -> list[Generation]:
        config, tokenizer = self.config, self.tokenizer
        prompt_ids = [tokenizer.encode_prompt(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise DataError(f"prompt {i} has no tokens; every prompt needs at least one (e.g. BOS)")
        if not prompt_ids:
            return []

        beam = config.beam_size if config.beam_size > 1 else 1
        prompts_per_batch = min(config.batch_size, len(prompt_ids))
        max_prompt_len = max(len(ids) for ids in prompt_ids)
        max_len = max_prompt_len + config.max_gen_len
        if max_len > self.model.config.max_seq_len:
            log.warning(
                "prompts of up to %d tokens + max_gen_len=%d exceed the model's max_seq_len=%d; "
                "positions beyond it were never trained",
                max_prompt_len, config.max_gen_len, self.model.config.max_seq_len,
            )
        # A multiple of 16 slots: the memory-efficient attention kernel wants the mask's
        # last dimension aligned (SDPA would otherwise pad the mask on every call).
        cache, step = self._decoder_for(prompts_per_batch * beam, -(-max_len // 16) * 16)
        # A fresh sampler per call: the same call with the same seed samples the same tokens.
        sampler = TokenSampler(
            greedy=config.is_greedy, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
            seed=config.seed, device=self.device,
        )

        order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
        results: list[Generation | None] = [None] * len(prompt_ids)
        for start in range(0, len(order), prompts_per_batch):
            batch_index = order[start : start + prompts_per_batch]
            batch_prompts = [prompt_ids[i] for i in batch_index]
            if beam > 1:
                outputs = _beam_batch(self.model, cache, step, batch_prompts, config, set(self.stop_ids), progress)
            elif sampler.greedy and self.decode_options.pick_in_step:
                state = self._greedy_state_for(cache.batch_size)
                outputs = _greedy_batch(self.model, cache, step, state, batch_prompts, config, self.stop_ids, progress)
            else:
                outputs = _sampling_batch(self.model, cache, step, sampler, batch_prompts, config, self.stop_ids, progress)
            for i, (tokens, logprobs, score, reason) in zip(batch_index, outputs):
                body = tokens[:-1] if reason == "stop" else tokens
                text = tokenizer.decode(prompt_ids[i] + body if config.echo_prompt else body)
                results[i] = Generation(prompt_ids[i], tokens, logprobs, score, reason, text)
            if on_batch is not None:
                on_batch([(i, results[i]) for i in batch_index])
        log.debug("decode step ran as: %s", step.path)
        generations = [r for r in results if r is not None]
        if stats is not None:
            stats.decode_path = step.path
            stats.num_prompts = len(generations)
            stats.num_generated_tokens = sum(len(g.tokens) for g in generations)
        return generations


def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int] | str],
    config: GeneratorConfig,
    *,
    stop_ids: Sequence[int] | None = None,
    progress: ProgressCallback | None = None,
    stats: GenerateStats | None = None,
    on_batch: BatchCallback | None = None,
) -> list[Generation]:
    """Responses to `prompts` (token ids, or text encoded with `tokenizer.encode_prompt`),
    in the same order. `stop_ids` defaults to `tokenizer.stop_ids`; pass `()` to always
    generate `max_gen_len` tokens (benchmarks). `progress(prompts, tokens)` is called as
    work completes; `stats` is filled in at the end.
    """
    generator = Generator(model, tokenizer, config, stop_ids=stop_ids)
    return generator(prompts, progress=progress, stats=stats, on_batch=on_batch)


def prefill(model: nn.Module, cache: StaticKVCache, prompts: list[list[int]], rows_per_prompt: int) -> tuple[Tensor, Tensor, Tensor]:
    """Left-pad `prompts` (each repeated `rows_per_prompt` times, then dummy rows up to the
    cache's batch size), run them through the model into the cache.

    Returns the last position's logits [R, V], the next position [R, 1] and which rows
    are real [R].
    """
    device = cache.valid_BS.device
    R = cache.batch_size
    T0 = max(len(p) for p in prompts)
    tokens_RT = torch.zeros(R, T0, dtype=torch.long)
    mask_RT = torch.zeros(R, T0, dtype=torch.bool)
    real_R = torch.zeros(R, dtype=torch.bool)
    for p, ids in enumerate(prompts):
        for r in range(p * rows_per_prompt, (p + 1) * rows_per_prompt):
            tokens_RT[r, T0 - len(ids) :] = torch.tensor(ids)
            mask_RT[r, T0 - len(ids) :] = True
            real_R[r] = True
    tokens_RT, mask_RT, real_R = tokens_RT.to(device), mask_RT.to(device), real_R.to(device)
    cache.reset(mask_RT)
    positions_RT = (mask_RT.long().cumsum(-1) - 1).clamp(min=0)
    hidden_RTD = model(tokens_RT, positions_BT=positions_RT, kv_cache=cache, return_hidden=True)
    logits_RV = model.lm_head(hidden_RTD[:, -1])
    return logits_RV, positions_RT[:, -1:] + 1, real_R


def _sampling_batch(
    model: nn.Module,
    cache: StaticKVCache,
    step: DecodeStep,
    sampler: TokenSampler,
    prompts: list[list[int]],
    config: GeneratorConfig,
    stop_ids: list[int],
    progress: ProgressCallback | None,
) -> list[tuple[list[int], list[float], float, str]]:
    logits_BV, positions_B1, real_B = prefill(model, cache, prompts, 1)
    device = logits_BV.device
    B, L = cache.batch_size, config.max_gen_len
    stop_S = torch.tensor(stop_ids, dtype=torch.long, device=device)
    tokens_BL = torch.zeros(B, L, dtype=torch.long, device=device)
    logprobs_BL = torch.zeros(B, L, dtype=torch.float32, device=device)
    done_B = ~real_B
    lengths_B = torch.zeros(B, dtype=torch.long, device=device)
    reported_tokens = 0
    for t in range(L):
        next_B, logprob_B = sampler.pick_and_score(logits_BV, compile=config.compile)
        active_B = ~done_B
        next_B = next_B.masked_fill(done_B, 0)
        tokens_BL[:, t] = next_B
        logprobs_BL[:, t] = logprob_B.masked_fill(done_B, 0.0)
        lengths_B += active_B
        done_B = done_B | torch.isin(next_B, stop_S)
        if t + 1 == L:
            break
        if (t + 1) % SYNC_EVERY_N_STEPS == 0:
            all_done, num_tokens = torch.stack([done_B.all().long(), lengths_B.sum()]).tolist()
            if progress is not None:
                progress(0, num_tokens - reported_tokens)
            reported_tokens = num_tokens
            if all_done:
                break
        logits_BV = step(next_B[:, None], positions_B1)
        positions_B1 = positions_B1 + 1

    return _batch_outputs(len(prompts), tokens_BL, logprobs_BL, lengths_B, stop_ids, progress, reported_tokens)


def _greedy_batch(
    model: nn.Module,
    cache: StaticKVCache,
    step: DecodeStep,
    state: GreedyLoopState,
    prompts: list[list[int]],
    config: GeneratorConfig,
    stop_ids: list[int],
    progress: ProgressCallback | None,
) -> list[tuple[list[int], list[float], float, str]]:
    """`_sampling_batch` for greedy decoding, each step's pick and bookkeeping inside
    the step (`DecodeStep.greedy`): the same tokens, one graph replay per token."""
    logits_BV, positions_B1, real_B = prefill(model, cache, prompts, 1)
    state.start(logits_BV, positions_B1, real_B)
    reported_tokens = 0
    for t in range(1, config.max_gen_len):
        if t % SYNC_EVERY_N_STEPS == 0:
            all_done, num_tokens = torch.stack([state.done_B.all().long(), state.lengths_B.sum()]).tolist()
            if progress is not None:
                progress(0, num_tokens - reported_tokens)
            reported_tokens = num_tokens
            if all_done:
                break
        step.greedy(state)
    return _batch_outputs(len(prompts), state.tokens_BL, state.logprobs_BL, state.lengths_B, stop_ids, progress,
                          reported_tokens)


def _batch_outputs(num_prompts: int, tokens_BL: Tensor, logprobs_BL: Tensor, lengths_B: Tensor, stop_ids: list[int],
                   progress: ProgressCallback | None, reported_tokens: int) -> list[tuple[list[int], list[float], float, str]]:
    """(tokens, logprobs, score, finish reason) of the batch's real rows."""
    lengths = lengths_B.tolist()
    tokens, logprobs = tokens_BL.tolist(), logprobs_BL.tolist()
    stops = set(stop_ids)
    outputs = []
    for b in range(num_prompts):
        n = lengths[b]
        row_tokens, row_logprobs = tokens[b][:n], logprobs[b][:n]
        reason = "stop" if n and row_tokens[-1] in stops else "length"
        outputs.append((row_tokens, row_logprobs, math.fsum(row_logprobs), reason))
    if progress is not None:
        progress(num_prompts, sum(lengths[:num_prompts]) - reported_tokens)
    return outputs


def _beam_batch(
    model: nn.Module,
    cache: StaticKVCache,
    step: DecodeStep,
    prompts: list[list[int]],
    config: GeneratorConfig,
    stop_ids: set[int],
    progress: ProgressCallback | None,
) -> list[tuple[list[int], list[float], float, str]]:
    K = config.beam_size
    logits_RV, positions_R1, _ = prefill(model, cache, prompts, K)
    on_step = (lambda num_tokens: progress(0, num_tokens)) if progress is not None else None
    best = beam_search(
        step, cache, logits_RV, positions_R1, num_prompts=len(prompts), beam_size=K,
        max_gen_len=config.max_gen_len, stop_ids=stop_ids, length_penalty=config.length_penalty, on_step=on_step,
    )
    if progress is not None:
        progress(len(prompts), 0)
    return [(h.tokens, h.logprobs, h.score, h.finish_reason) for h in best]
