"""Text generation: a batched KV-cache generator (greedy, sampling, beam search)
and answer scoring.

    from ft.generation import GeneratorConfig, generate
    outputs = generate(model, tokenizer, ["2 + 2 ="], GeneratorConfig(greedy=True, max_gen_len=32))
    outputs[0].text, outputs[0].tokens, outputs[0].logprobs
"""

from ft.lazy_exports import lazy_exports

# Imported on first use, so that `ft.generation.generator_config` (a recipe config section) imports without torch.
__getattr__ = lazy_exports(__name__, {
    "ft.generation.beam": ("Hypothesis", "beam_search"),
    "ft.generation.cache": ("StaticKVCache",),
    "ft.generation.decode_step": ("DecodeOptions", "DecodeStep"),
    "ft.generation.generator": ("Generation", "GenerateStats", "Generator", "generate", "prefill"),
    "ft.generation.generator_config": ("GeneratorConfig",),
    "ft.generation.sampling": ("TokenSampler", "filter_logits", "greedy_next", "sample_next"),
    "ft.generation.scoring": ("ScoreSummary", "exact_match", "extract_answer", "extract_reference_answer",
                              "normalize_number", "score_generations"),
})

__all__ = [
    "DecodeOptions",
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
