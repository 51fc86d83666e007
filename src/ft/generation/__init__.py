"""Text generation: a batched KV-cache generator (greedy, sampling, beam search)
and answer scoring.

    from ft.generation import GeneratorConfig, generate
    outputs = generate(model, tokenizer, ["2 + 2 ="], GeneratorConfig(greedy=True, max_gen_len=32))
    outputs[0].text, outputs[0].tokens, outputs[0].logprobs
"""

from ft.generation.beam_search import Hypothesis, beam_search
from ft.generation.cache import StaticKVCache
from ft.generation.decode_step import DecodeStep
from ft.generation.generator import Generation, GenerateStats, Generator, GeneratorConfig, generate, prefill
from ft.generation.sampling import TokenSampler, filter_logits, greedy_next, sample_next
from ft.generation.scoring import (
    ScoreSummary,
    exact_match,
    extract_answer,
    extract_reference_answer,
    normalize_number,
    score_generations,
)

__all__ = [
    "DecodeStep",
    "GenerateStats",
    "Generation",
    "Generator",
    "GeneratorConfig",
    "Hypothesis",
    "ScoreSummary",
    "StaticKVCache",
    "TokenSampler",
    "beam_search",
    "exact_match",
    "extract_answer",
    "extract_reference_answer",
    "filter_logits",
    "generate",
    "greedy_next",
    "normalize_number",
    "prefill",
    "sample_next",
    "score_generations",
]
