"""The torch.compile'd decode step gives the eager tokens and log-probs, and a second
generator of the same shapes reuses the compiled code (no recompile per call)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from generation_helpers import IdTokenizer, random_prompts, tiny_model

from ft.generation import GenerateStats, GeneratorConfig, generate


def test_compiled_decode_step_matches_eager():
    model = tiny_model()
    prompts = random_prompts([5, 9, 3, 7])
    eager = generate(model, IdTokenizer(), prompts, GeneratorConfig(greedy=True, max_gen_len=12, batch_size=3))
    stats = GenerateStats()
    config = GeneratorConfig(greedy=True, max_gen_len=12, batch_size=3, compile=True)
    compiled = generate(model, IdTokenizer(), prompts, config, stats=stats)
    if stats.decode_path == "eager":
        pytest.skip("torch.compile is unavailable here (the step fell back to eager, as designed)")
    assert stats.decode_path == "compile"
    assert [c.tokens for c in compiled] == [e.tokens for e in eager]
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(e.logprobs), atol=1e-4, rtol=1e-4)

    # A second generator (new cache, new decode step) of the same shapes: dynamo's
    # graph count must not move, and the step must still be the compiled one.
    graphs_before = counters["stats"]["unique_graphs"]
    again_stats = GenerateStats()
    again = generate(model, IdTokenizer(), prompts, config, stats=again_stats)
    assert again_stats.decode_path == "compile"
    assert counters["stats"]["unique_graphs"] == graphs_before, "a second generator of the same shapes compiled again"
    assert [a.tokens for a in again] == [e.tokens for e in eager]
    for a, e in zip(again, eager):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(e.logprobs), atol=1e-4, rtol=1e-4)
