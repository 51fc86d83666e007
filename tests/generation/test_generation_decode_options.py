"""Every `DecodeOptions` variant of the decode step gives the default path's greedy
tokens: attending over the whole cache (the path before window buckets) and one
static compile per bucket, for one prompt and for a batch of different lengths."""

from __future__ import annotations

import os

import pytest
import torch
from generation_helpers import IdTokenizer, random_prompts, tiny_model

from ft.generation import DecodeOptions, DecodeStep, GenerateStats, Generator, GeneratorConfig, StaticKVCache


def _generate(model, prompts, *, options: DecodeOptions, compile: bool = False, max_gen_len: int = 40):
    config = GeneratorConfig(greedy=True, max_gen_len=max_gen_len, batch_size=len(prompts), compile=compile)
    stats = GenerateStats()
    outputs = Generator(model, IdTokenizer(stop_ids=()), config, decode_options=options)(prompts, stats=stats)
    return outputs, stats.decode_path


@pytest.mark.parametrize("lengths", [[9], [9, 3, 6, 1]], ids=["batch_1", "mixed_lengths"])
def test_whole_cache_attention_gives_the_windowed_tokens(lengths):
    model = tiny_model(seed=3)
    prompts = random_prompts(lengths, seed=5)
    # 9 + 40 tokens: a 64-slot cache, windows of 16, 32, 48 and 64 slots as it fills.
    windowed, _ = _generate(model, prompts, options=DecodeOptions())
    whole, _ = _generate(model, prompts, options=DecodeOptions(windowed=False))
    assert [w.tokens for w in whole] == [w.tokens for w in windowed]
    assert all(len(w.tokens) == 40 for w in windowed)
    for a, b in zip(whole, windowed):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)


def test_whole_cache_option_keeps_the_window_at_the_cache_length():
    model = tiny_model()
    cache = StaticKVCache(model, batch_size=1, max_len=64)
    step = DecodeStep(model, cache, cuda_graph=False, compile=False, options=DecodeOptions(windowed=False))
    with torch.inference_mode():
        cache.reset(torch.ones(1, 3, dtype=torch.bool))
        model(torch.tensor([[5, 6, 7]]), positions_BT=torch.arange(3)[None], kv_cache=cache)
        step(torch.tensor([[8]]), torch.tensor([[3]]))
    assert cache.window_len == 64


def test_static_compile_per_bucket_gives_the_eager_tokens():
    model = tiny_model(seed=2)
    prompts = random_prompts([7, 2], seed=6)
    # 7 + 20 tokens: a 32-slot cache, buckets of 16 and 32 slots (two static compiles).
    eager, _ = _generate(model, prompts, options=DecodeOptions(), max_gen_len=20)
    static, path = _generate(model, prompts, options=DecodeOptions(dynamic_window=False), compile=True, max_gen_len=20)
    if path == "eager":
        pytest.skip("torch.compile is unavailable here (the step fell back to eager, as designed)")
    assert path == "compile"
    assert [s.tokens for s in static] == [e.tokens for e in eager]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_math_attention_and_inductor_options_give_the_default_tokens(compile):
    model = tiny_model(seed=4)
    prompts = random_prompts([8, 3], seed=7)
    default, _ = _generate(model, prompts, options=DecodeOptions(), max_gen_len=20)
    options = DecodeOptions(attention="math",
                            inductor_options=(("coordinate_descent_tuning", True),) if compile else ())
    other, path = _generate(model, prompts, options=options, compile=compile, max_gen_len=20)
    if compile and path == "eager":
        pytest.skip("torch.compile is unavailable here (the step fell back to eager, as designed)")
    assert path == ("compile" if compile else "eager")
    assert [o.tokens for o in other] == [d.tokens for d in default]
    for a, b in zip(other, default):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=1e-4)


def test_a_compile_mode_with_inductor_options_is_refused():
    from ft.generation.decode_step import compiled_decode_forward

    with pytest.raises(ValueError, match="mode"):
        compiled_decode_forward("max-autotune", True, (("coordinate_descent_tuning", True),))


def _greedy(model, prompts, *, pick_in_step: bool, compile: bool, stop_ids, batch_size: int, max_gen_len: int = 24):
    config = GeneratorConfig(greedy=True, max_gen_len=max_gen_len, batch_size=batch_size, compile=compile)
    stats = GenerateStats()
    generator = Generator(model, IdTokenizer(stop_ids=stop_ids), config,
                          decode_options=DecodeOptions(pick_in_step=pick_in_step))
    return generator(prompts, stats=stats), stats.decode_path


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_picking_inside_the_step_gives_the_tokens_of_picking_after_it(compile, caplog):
    model = tiny_model(seed=8)
    # Five prompts in batches of 3: the second batch has a dummy row.
    prompts = random_prompts([6, 2, 9, 4, 3], seed=9)
    free, _ = _greedy(model, prompts, pick_in_step=False, compile=False, stop_ids=(), batch_size=3)
    # A stop id the first prompt picks by its 6th token: rows stop at different steps.
    stop = free[0].tokens[5]
    first_stop = free[0].tokens.index(stop) + 1
    after, _ = _greedy(model, prompts, pick_in_step=False, compile=False, stop_ids=(stop,), batch_size=3)
    with caplog.at_level("WARNING", logger="ft"):
        inside, path = _greedy(model, prompts, pick_in_step=True, compile=compile, stop_ids=(stop,), batch_size=3)
    if compile and path == "eager":
        pytest.skip("torch.compile is unavailable here (the step fell back to eager, as designed)")
    assert path == ("compile" if compile else "eager")
    assert not [r for r in caplog.records if "failed" in r.getMessage()]
    assert {a.finish_reason for a in after} == {"stop", "length"}
    assert [i.tokens for i in inside] == [a.tokens for a in after]
    assert [i.finish_reason for i in inside] == [a.finish_reason for a in after]
    assert inside[0].tokens == free[0].tokens[:first_stop]
    for a, b in zip(inside, after):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=1e-4)


def test_a_generator_reuses_its_greedy_state_across_calls():
    model = tiny_model(seed=8)
    prompts = random_prompts([5, 7], seed=3)
    config = GeneratorConfig(greedy=True, max_gen_len=12, batch_size=2)
    generator = Generator(model, IdTokenizer(stop_ids=()), config)
    first = generator(prompts)
    state = generator._greedy_state
    second = generator(prompts)
    assert generator._greedy_state is state
    assert [f.tokens for f in first] == [s.tokens for s in second]


@pytest.mark.parametrize("attention", ["flex", "split_kv"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_decode_kernels_give_the_default_tokens(attention, compile):
    # Off the GPU the split-KV op runs SDPA: this checks the cache's key mask and the model's dispatch.
    model = tiny_model(seed=4)
    prompts = random_prompts([8, 3, 5], seed=2)
    default, _ = _generate(model, prompts, options=DecodeOptions(), max_gen_len=20)
    other, path = _generate(model, prompts, options=DecodeOptions(attention=attention), compile=compile, max_gen_len=20)
    if compile and path == "eager":
        pytest.skip("torch.compile is unavailable here (the step fell back to eager, as designed)")
    assert path == ("compile" if compile else "eager")
    assert [o.tokens for o in other] == [d.tokens for d in default]
    for a, b in zip(other, default):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=1e-4)


def test_flex_decoding_hands_the_model_a_key_mask_for_one_new_token_only():
    from ft.models.attention_mask import FlexKeyMask

    model = tiny_model()
    cache = StaticKVCache(model, batch_size=2, max_len=32)
    DecodeStep(model, cache, cuda_graph=False, compile=False, options=DecodeOptions(attention="flex"))
    cache.reset(torch.ones(2, 4, dtype=torch.bool))
    assert isinstance(cache.attention_mask(4), torch.Tensor)  # the prefill stays on SDPA
    mask = cache.attention_mask(1)
    assert isinstance(mask, FlexKeyMask) and mask.allowed_BTS.shape == (2, 1, 32)


def test_split_kv_decoding_hands_the_model_a_key_mask_for_one_new_token_only():
    from ft.models.attention_mask import DecodeKeyMask

    model = tiny_model()
    cache = StaticKVCache(model, batch_size=2, max_len=32)
    DecodeStep(model, cache, cuda_graph=False, compile=False, options=DecodeOptions(attention="split_kv"))
    cache.reset(torch.tensor([[False, True, True, True], [True] * 4]))
    assert isinstance(cache.attention_mask(4), torch.Tensor)  # the prefill stays on SDPA
    mask = cache.attention_mask(1)  # the query at slot 0: its own slot (padding there) and nothing later
    assert isinstance(mask, DecodeKeyMask) and mask.allowed_BS.shape == (2, 32)
    assert mask.allowed_BS[:, 0].all() and not mask.allowed_BS[:, 1:].any()


def test_decoding_attention_defaults_to_split_kv_on_cuda_only():
    from ft.generation.decode_step import decode_kernel_for

    assert decode_kernel_for(None, torch.device("cpu")) is None
    assert decode_kernel_for("sdpa", torch.device("cuda")) is None
    assert decode_kernel_for("math", torch.device("cuda")) is None
    assert decode_kernel_for("flex", torch.device("cpu")) == "flex"
    if torch.cuda.is_available():
        assert decode_kernel_for(None, torch.device("cuda")) == "split_kv"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_split_kv_kernels_in_the_captured_greedy_step_give_the_default_tokens(dtype):
    # 12 rows x 2 KV heads: few programs, so the keys are split and combined.
    model = tiny_model(seed=8).cuda().to(dtype)
    prompts = random_prompts([6, 2, 9, 4, 3, 7, 1, 8, 5, 5, 2, 9], seed=9)
    config = GeneratorConfig(greedy=True, max_gen_len=40, batch_size=12, cuda_graphs=True, compile=True)
    sdpa = Generator(model, IdTokenizer(stop_ids=()), config, decode_options=DecodeOptions(attention="sdpa"))(prompts)
    stats = GenerateStats()
    split = Generator(model, IdTokenizer(stop_ids=()), config,
                      decode_options=DecodeOptions(attention="split_kv"))(prompts, stats=stats)
    assert stats.decode_path == "compile+cuda_graph"
    if dtype == torch.float32:
        assert [s.tokens for s in split] == [d.tokens for d in sdpa]
        return
    agree = [len(os.path.commonprefix([s.tokens, d.tokens])) for s, d in zip(split, sdpa)]
    # bfloat16 rounding differs between the kernels: near-ties may flip late, never from the start.
    assert min(agree) >= 8 and sum(agree) >= 0.9 * 40 * len(prompts), agree


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_of_the_greedy_step_gives_the_tokens_of_picking_after_it():
    model = tiny_model(seed=8).cuda()
    prompts = random_prompts([6, 2, 9, 4, 3], seed=9)
    config = GeneratorConfig(greedy=True, max_gen_len=40, batch_size=3, cuda_graphs=True)
    outside = Generator(model, IdTokenizer(stop_ids=()), GeneratorConfig(**{**vars(config), "cuda_graphs": False}),
                        decode_options=DecodeOptions(pick_in_step=False))(prompts)
    stats = GenerateStats()
    inside = Generator(model, IdTokenizer(stop_ids=()), config)(prompts, stats=stats)
    assert stats.decode_path == "eager+cuda_graph"
    assert [i.tokens for i in inside] == [o.tokens for o in outside]
    for a, b in zip(inside, outside):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=1e-4)


def test_a_one_row_compiled_step_is_tuned_unless_told_otherwise():
    from ft.generation.decode_step import _compiled_decode_forward

    model = tiny_model()
    for rows, options, tuned in [(1, DecodeOptions(), True), (2, DecodeOptions(), False),
                                 (1, DecodeOptions(tune_one_row=False), False),
                                 (1, DecodeOptions(compile_mode="max-autotune-no-cudagraphs"), False)]:
        _compiled_decode_forward.clear()
        DecodeStep(model, StaticKVCache(model, batch_size=rows, max_len=16), cuda_graph=False, compile=True,
                   options=options)
        assert any(key[3] == (("coordinate_descent_tuning", True),) for key in _compiled_decode_forward) == tuned
