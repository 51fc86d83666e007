"""Decoding rules: beam 1 == greedy, exact beam search on a tiny vocabulary,
seeded sampling, top-k / top-p filters, order and batching invariance, echo,
per-row stopping, log-probs against a full forward, bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from generation_helpers import IdTokenizer, random_prompts, tiny_model

from ft.errors import ConfigError, DataError
from ft.generation import (
    DecodeStep,
    GenerateStats,
    GeneratorConfig,
    StaticKVCache,
    beam_search,
    filter_logits,
    generate,
    prefill,
    sample_next,
)

LENGTHS = [6, 2, 9, 4, 7]


def greedy(**kw) -> GeneratorConfig:
    return GeneratorConfig(greedy=True, **{"max_gen_len": 12, "batch_size": 2, **kw})


def pick_stop_id(model, prompts) -> int:
    """A token that greedy decoding produces in some rows but not all."""
    free = generate(model, IdTokenizer(), prompts, greedy(), stop_ids=())
    for g in free:
        for t in g.tokens[1:-1]:
            if any(t not in other.tokens for other in free):
                return t
    raise AssertionError("no suitable stop id; change the seed")


def run_beam(model, prompts, *, beam_size, max_gen_len, stop_ids, length_penalty=1.0):
    cache = StaticKVCache(model, batch_size=len(prompts) * beam_size, max_len=max(map(len, prompts)) + max_gen_len)
    step = DecodeStep(model, cache, cuda_graph=False, compile=False)
    with torch.inference_mode():
        logits_RV, positions_R1, _ = prefill(model, cache, prompts, beam_size)
        return beam_search(
            step, cache, logits_RV, positions_R1, num_prompts=len(prompts), beam_size=beam_size,
            max_gen_len=max_gen_len, stop_ids=set(stop_ids), length_penalty=length_penalty,
        )


def test_beam_search_with_one_beam_is_greedy():
    model = tiny_model()
    prompts = random_prompts(LENGTHS)
    stop = pick_stop_id(model, prompts)
    expected = generate(model, IdTokenizer([stop]), prompts, greedy())
    got = run_beam(model, prompts, beam_size=1, max_gen_len=12, stop_ids=[stop])
    assert [h.tokens for h in got] == [g.tokens for g in expected]
    assert {g.finish_reason for g in expected} == {"stop", "length"}
    assert [h.finish_reason for h in got] == [g.finish_reason for g in expected]
    for h, g in zip(got, expected):
        torch.testing.assert_close(torch.tensor(h.logprobs), torch.tensor(g.logprobs))


def sequence_logprob(model, prompt, continuation) -> float:
    with torch.no_grad():
        lp_TV = model(torch.tensor([prompt + continuation]))[0].log_softmax(-1)
    return sum(lp_TV[len(prompt) - 1 + i, tok].item() for i, tok in enumerate(continuation))


def test_beam_search_is_exact_when_beams_cover_the_vocabulary():
    # With K = V beams, every first token survives, so the best 2-token continuation is found.
    V = 6
    model = tiny_model(seed=4, vocab_size=V)
    prompts = [[1, 3, 4], [2, 5], [1]]
    got = run_beam(model, prompts, beam_size=V, max_gen_len=2, stop_ids=[], length_penalty=0.0)
    for prompt, hyp in zip(prompts, got):
        best = max(itertools.product(range(V), repeat=2), key=lambda c: sequence_logprob(model, prompt, list(c)))
        assert hyp.tokens == list(best)
        assert hyp.score == pytest.approx(sequence_logprob(model, prompt, list(best)), abs=1e-4)
        assert hyp.finish_reason == "length"


def test_beam_search_through_generate_scores_normalized_by_length():
    model = tiny_model(seed=2)
    prompts = random_prompts(LENGTHS)
    stop = pick_stop_id(model, prompts)
    tok = IdTokenizer([stop])
    beam_out = generate(model, tok, prompts, greedy(beam_size=4, length_penalty=1.0))
    assert len(beam_out) == len(prompts)
    assert {b.finish_reason for b in beam_out} <= {"stop", "length"}
    for b, prompt in zip(beam_out, prompts):
        assert b.score == pytest.approx(math.fsum(b.logprobs) / len(b.tokens), abs=1e-5)
        assert b.score == pytest.approx(sequence_logprob(model, prompt, b.tokens) / len(b.tokens), abs=1e-4)
        if b.finish_reason == "stop":
            assert b.tokens[-1] == stop and stop not in b.tokens[:-1]


def test_greedy_is_independent_of_batching_and_keeps_input_order():
    model = tiny_model()
    prompts = random_prompts(LENGTHS)
    reference = [generate(model, IdTokenizer(), [p], greedy())[0].tokens for p in prompts]
    for batch_size in (1, 2, 3, 16):
        outputs = generate(model, IdTokenizer(), prompts, greedy(batch_size=batch_size))
        assert [o.tokens for o in outputs] == reference
        assert [o.prompt_tokens for o in outputs] == prompts


def test_logprobs_and_scores_match_a_full_forward():
    model = tiny_model()
    prompts = random_prompts(LENGTHS)
    for prompt, out in zip(prompts, generate(model, IdTokenizer(), prompts, greedy())):
        with torch.no_grad():
            lp_TV = model(torch.tensor([prompt + out.tokens]))[0].log_softmax(-1)
        expected = [lp_TV[len(prompt) - 1 + i, t].item() for i, t in enumerate(out.tokens)]
        torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(expected), atol=1e-5, rtol=1e-5)
        assert out.score == pytest.approx(sum(expected), abs=1e-4)
        # Greedy: each token is the argmax of its position.
        assert out.tokens == [lp_TV[len(prompt) - 1 + i].argmax().item() for i in range(len(out.tokens))]


def test_rows_stop_on_their_own_stop_token():
    model = tiny_model()
    prompts = random_prompts(LENGTHS)
    stop = pick_stop_id(model, prompts)
    outputs = generate(model, IdTokenizer([stop, 95]), prompts, greedy())
    reasons = set()
    for out in outputs:
        reasons.add(out.finish_reason)
        if out.finish_reason == "stop":
            assert out.tokens[-1] in (stop, 95) and not set(out.tokens[:-1]) & {stop, 95}
        else:
            assert len(out.tokens) == 12
    assert reasons == {"stop", "length"}
    # The text leaves the stop token out.
    stopped = next(o for o in outputs if o.finish_reason == "stop")
    assert stopped.text == IdTokenizer().decode(stopped.tokens[:-1])


def test_echo_prompt_prefixes_the_prompt_text():
    model = tiny_model()
    prompts = random_prompts([4, 6])
    plain = generate(model, IdTokenizer(), prompts, greedy())
    echoed = generate(model, IdTokenizer(), prompts, greedy(echo_prompt=True))
    for p, a, b in zip(prompts, plain, echoed):
        assert a.tokens == b.tokens
        assert b.text == IdTokenizer().decode(p + a.tokens)


def sample(model, prompts, **kw):
    config = GeneratorConfig(**{"max_gen_len": 16, "batch_size": 3, "temperature": 1.0, "top_p": 1.0, **kw})
    return [o.tokens for o in generate(model, IdTokenizer(), prompts, config, stop_ids=())]


def test_sampling_is_reproducible_with_a_seed_and_varies_across_seeds():
    model = tiny_model()
    prompts = random_prompts(LENGTHS)
    first = sample(model, prompts, seed=3)
    assert sample(model, prompts, seed=3) == first
    assert sample(model, prompts, seed=4) != first
    assert first != [o.tokens for o in generate(model, IdTokenizer(), prompts, greedy(max_gen_len=16), stop_ids=())]


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = tiny_model()
    prompts = random_prompts(LENGTHS)
    expected = [o.tokens for o in generate(model, IdTokenizer(), prompts, greedy(max_gen_len=16), stop_ids=())]
    assert sample(model, prompts, top_k=1, seed=5) == expected
    assert sample(model, prompts, top_p=1e-6, seed=6) == expected
    assert sample(model, prompts, temperature=0.0, seed=7) == expected  # temperature 0 means greedy


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda f: torch.isfinite(f).squeeze(0).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_p=0.7)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_p=0.5)) == [False, True, False, False]  # 0.5 alone reaches it
    assert kept(filter_logits(logits, top_p=0.81)) == [False, True, True, True]
    assert kept(filter_logits(logits, top_p=1.0)) == [True] * 4
    scaled = filter_logits(logits, temperature=0.5)
    torch.testing.assert_close(scaled.softmax(-1), (probs**2) / (probs**2).sum())


def test_sampling_follows_the_filtered_distribution():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits_BV = probs.log().expand(20000, 4)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits_BV, temperature=1.0, generator=gen), minlength=4) / 20000
    torch.testing.assert_close(counts, probs, atol=0.015, rtol=0)
    counts = torch.bincount(sample_next(logits_BV, temperature=1.0, top_p=0.7, generator=gen), minlength=4) / 20000
    torch.testing.assert_close(counts, torch.tensor([0.0, 0.625, 0.0, 0.375]), atol=0.015, rtol=0)


def test_stats_and_text_prompts():
    model = tiny_model()
    stats = GenerateStats()
    outputs = generate(model, IdTokenizer(), ["5 6 7", "8"], greedy(), stats=stats)
    assert [o.prompt_tokens for o in outputs] == [[1, 5, 6, 7], [1, 8]]
    assert stats.decode_path == "eager" and stats.num_prompts == 2
    assert stats.num_generated_tokens == sum(len(o.tokens) for o in outputs)


def test_bad_input_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(DataError, match="prompt 1 has no tokens"):
        generate(model, IdTokenizer(), [[1, 2], []], greedy())
    with pytest.raises(ConfigError, match="generator_config.top_p"):
        generate(model, IdTokenizer(), [[1, 2]], GeneratorConfig(top_p=0.0))
    with pytest.raises(ConfigError, match="generator_config.beam_size"):
        generate(model, IdTokenizer(), [[1, 2]], GeneratorConfig(beam_size=0))
    assert generate(model, IdTokenizer(), [], greedy()) == []


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_pick_and_score_gives_each_token_its_log_softmax(greedy):
    from ft.generation.sampling import TokenSampler

    logits_BV = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 4
    sampler = TokenSampler(greedy=greedy, temperature=0.7, top_k=5, top_p=1.0, seed=1, device=torch.device("cpu"))
    next_B, logprob_B = sampler.pick_and_score(logits_BV, compile=True)  # compile is for CUDA: eager here
    if greedy:
        assert next_B.tolist() == logits_BV.argmax(-1).tolist()
    expected_B = torch.log_softmax(logits_BV.float(), dim=-1).gather(1, next_B[:, None]).squeeze(1)
    assert logprob_B.dtype == torch.float32
    torch.testing.assert_close(logprob_B, expected_B, atol=1e-5, rtol=1e-5)


def test_a_failing_compiled_picker_falls_back_to_eager(monkeypatch, caplog):
    from ft.generation import sampling

    def broken_compile(fn, **kwargs):
        def fails(*args):
            raise RuntimeError("no compiler here")
        return fails

    monkeypatch.setattr(sampling, "_compiled", {})
    monkeypatch.setattr(sampling.torch, "compile", broken_compile)
    logits_BV = torch.randn(2, 30)
    picker = sampling._on_cuda_compiled("greedy", sampling.greedy_and_logprobs)
    with caplog.at_level("WARNING", logger="ft"):
        next_B, logprob_B = picker(logits_BV)
    assert "running it eagerly" in caplog.text
    assert next_B.tolist() == logits_BV.argmax(-1).tolist()
    assert sampling._compiled["greedy"] is sampling.greedy_and_logprobs  # no second attempt
