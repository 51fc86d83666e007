"""Tensor parallelism (tp=2 on gloo) gives one process's float32 logits for every
family beyond Llama: Qwen2 (q/k/v bias, sharded with its columns), Qwen3 (per-head
q_norm / k_norm, replicated; head_dim != dim / n_heads) and Mistral (GQA, explicit
head_dim), tied and untied. Every parameter, bias and norm included, gets random
values, so a bias or norm sharded the wrong way changes the logits."""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from dist_launcher import run_distributed  # noqa: E402
from ft.gang import setup_gangs, teardown_gangs
from ft.models.build import build_model, create_model
from ft.models.family import find_arch
from ft.models.parallelize import parallelize_model

ARCHS = ["qwen2_debug", "qwen2_debug_tied", "qwen3_debug", "qwen3_debug_tied", "mistral_debug"]


def _reference(arch: str) -> torch.nn.Module:
    config = find_arch(arch)[1]
    model = build_model(config, device="cpu", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.1)
    return model


def _tp_logits_match(rank: int, archs: list[str], directory: str) -> None:
    torch.use_deterministic_algorithms(True)
    gangs = setup_gangs(device="cpu", tensor_parallel_size=2)
    try:
        for arch in archs:
            reference = _reference(arch)
            path = Path(directory) / f"{arch}_rank{rank}.safetensors"
            tied = reference.config.tie_embeddings
            save_file({k: v.contiguous() for k, v in reference.state_dict().items()
                       if not (tied and k == "lm_head.weight")}, str(path))
            model = create_model(reference.config, device="cpu", checkpoint=path,
                                 parallelize=functools.partial(parallelize_model, gangs=gangs))
            names = {n for n, p in model.named_parameters() if isinstance(p, DTensor)}
            if reference.config.attention_bias:
                assert "model.layers.0.self_attn.q_proj.bias" in names, arch
            g = torch.Generator().manual_seed(2)
            tokens_BT = torch.randint(0, reference.config.vocab_size, (2, 11), generator=g)
            with torch.no_grad():
                expected_BTV = reference(tokens_BT)
                logits_BTV = model(tokens_BT)
            assert not isinstance(logits_BTV, DTensor)
            torch.testing.assert_close(logits_BTV, expected_BTV, rtol=1e-5, atol=1e-5, msg=lambda m, a=arch: f"{a}: {m}")
        gangs.root.barrier()
    finally:
        teardown_gangs(gangs)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_tp2_logits_equal_one_process(tmp_path, family):
    run_distributed(_tp_logits_match, 2, [a for a in ARCHS if a.startswith(family)], str(tmp_path))


def test_debug_archs_exercise_each_feature():
    qwen2, qwen3 = find_arch("qwen2_debug")[1], find_arch("qwen3_debug")[1]
    assert qwen2.attention_bias and qwen3.qk_norm
    assert qwen3.head_dim != qwen3.dim // qwen3.n_heads
    assert dataclasses.replace(qwen2, tie_embeddings=True) == find_arch("qwen2_debug_tied")[1]
