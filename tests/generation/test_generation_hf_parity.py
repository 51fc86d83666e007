"""Greedy generation equals transformers' `generate(do_sample=False)` token for token
(and log-prob for log-prob), for a batch of prompts of different lengths loaded from
an HF `save_pretrained` directory, with per-sequence stopping."""

from __future__ import annotations

import pytest
import torch
from generation_helpers import IdTokenizer, random_prompts

from ft.generation import GeneratorConfig, generate
from ft.models import load_model

transformers = pytest.importorskip("transformers")

VOCAB = 96
MAX_NEW = 24


def make_hf_model(tmp_path, *, tied: bool):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=tied, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
    )
    hf = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "embed" in name or "lm_head" in name:
                p.normal_(0, 1.0)  # peaked distributions: greedy choices far from ties
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf


def hf_greedy(hf, prompts, eos: int | None):
    """HF batched greedy: left padding plus attention_mask; rows cut after their first EOS."""
    T0 = max(len(p) for p in prompts)
    ids_BT = torch.tensor([[0] * (T0 - len(p)) + p for p in prompts])
    mask_BT = torch.tensor([[0] * (T0 - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(
            ids_BT, attention_mask=mask_BT, do_sample=False, max_new_tokens=MAX_NEW, min_new_tokens=0,
            eos_token_id=eos if eos is not None else VOCAB + 10, pad_token_id=0,
            output_scores=True, return_dict_in_generate=True, num_beams=1, temperature=None, top_p=None, top_k=None,
        )
    rows, logprobs = [], []
    scores_BSV = torch.stack(out.scores, dim=1).log_softmax(-1)
    for b, row in enumerate(out.sequences[:, T0:].tolist()):
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        rows.append(row)
        logprobs.append([scores_BSV[b, t, tok].item() for t, tok in enumerate(row)])
    return rows, logprobs


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_equals_transformers_generate(tmp_path, tied):
    hf = make_hf_model(tmp_path, tied=tied)
    model = load_model(tmp_path, dtype=torch.float32)
    prompts = random_prompts([7, 3, 12, 5, 9, 1], vocab_size=VOCAB)
    config = GeneratorConfig(greedy=True, max_gen_len=MAX_NEW, batch_size=4)

    # Without stopping first, to pick a stop id that ends some rows early and not others.
    free = generate(model, IdTokenizer(), prompts, config, stop_ids=())
    candidates = [t for g in free for t in g.tokens[2:-2] if any(t not in other.tokens for other in free)]
    assert candidates, "no token ends some rows and not others; change the seed"
    eos = candidates[0]

    expected_tokens, expected_logprobs = hf_greedy(hf, prompts, eos)
    outputs = generate(model, IdTokenizer(stop_ids=[eos]), prompts, config)
    for g, tokens, logprobs in zip(outputs, expected_tokens, expected_logprobs):
        assert g.tokens == tokens
        assert g.finish_reason == ("stop" if tokens[-1] == eos else "length")
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(logprobs), atol=1e-4, rtol=1e-4)
    assert sum(g.finish_reason == "stop" for g in outputs) >= 1
    assert sum(g.finish_reason == "length" for g in outputs) >= 1
