"""FSDP, DDP, TP and FSDP x TP on gloo match one process, step for step.

Each case builds a tiny Llama on meta, parallelizes it, materializes it, loads the
reference weights shard by shard (from a state dict or lazily from a safetensors
file), then runs two SGD steps on one fixed global batch of packed rows. Every
rank checks, against a single-process reference computed in the same process:
the loaded weights, the loss of each step, every parameter's full gradient, and the
weights gathered by `iter_full_state_dict` after training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from dist_launcher import run_distributed  # noqa: E402
from ft.errors import ConfigError
from ft.gang import setup_gangs, teardown_gangs
from ft.models.llama.model import Llama, LlamaConfig
from ft.models.checkpoint import load_checkpoint
from ft.models.parallelize import (
    check_parallel_layout, iter_full_state_dict, parallelize_model,
)
from ft.training.loss import chunked_cross_entropy_sum, cross_entropy_sum

CONFIG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
B, T, STEPS = 4, 12, 2


@dataclasses.dataclass(frozen=True)
class Case:
    tp: int = 1
    replicas: int = 1
    data_parallelism: str = "fsdp"
    tied: bool = False
    loss: str = "chunked"  # "chunked" (trainer's path through lm_head.weight), "logits", "loss_parallel"
    activation_checkpointing: str = "none"
    safetensors: str | None = None  # load from this file instead of a state dict
    vocab_size: int = CONFIG.vocab_size
    sequence_parallel: bool = False


def _batch(vocab_size: int):
    g = torch.Generator().manual_seed(1)
    tokens_BT = torch.randint(0, vocab_size, (B, T), generator=g)
    labels_BT = torch.randint(0, vocab_size, (B, T), generator=g)
    labels_BT[:, :3] = -100  # prompt tokens carry no loss
    # Two documents per row, positions restarting at each.
    document_ids_BT = (torch.arange(T) >= T // 2).long().expand(B, T).clone()
    positions_BT = torch.cat([torch.arange(T // 2), torch.arange(T - T // 2)]).expand(B, T).clone()
    return tokens_BT, labels_BT, positions_BT, document_ids_BT


def _loss_sum(model, loss: str, tokens_BT, labels_BT, positions_BT, document_ids_BT):
    kw = dict(positions_BT=positions_BT, document_ids_BT=document_ids_BT)
    if loss == "chunked":
        hidden_BTD = model(tokens_BT, return_hidden=True, **kw)
        return chunked_cross_entropy_sum(hidden_BTD, model.lm_head, labels_BT, chunk_size=8)
    if loss == "loss_parallel":
        logits_BTV = model(tokens_BT, **kw)
        assert isinstance(logits_BTV, DTensor) and logits_BTV.to_local().shape[-1] < logits_BTV.shape[-1]
        return cross_entropy_sum(logits_BTV, labels_BT)  # under loss_parallel(), see below
    return cross_entropy_sum(model(tokens_BT, **kw), labels_BT)


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _train_and_compare(rank: int, case: Case) -> None:
    torch.use_deterministic_algorithms(True)
    gangs = setup_gangs(device="cpu", tensor_parallel_size=case.tp, replicas=case.replicas)
    try:
        config = dataclasses.replace(CONFIG, tie_embeddings=case.tied, vocab_size=case.vocab_size)
        reference = Llama(config)
        reference.init_weights(seed=0)

        with torch.device("meta"):
            model = Llama(config)
        parallelize_model(
            model, gangs, data_parallelism=case.data_parallelism, activation_checkpointing=case.activation_checkpointing,
            loss_parallel=case.loss == "loss_parallel", sequence_parallel=case.sequence_parallel,
        )
        model.to_empty(device="cpu")
        model.reset_buffers()
        if case.tied:
            assert model.lm_head.weight is model.model.embed_tokens.weight
        checkpoint = case.safetensors
        if checkpoint is None:
            import tempfile

            from safetensors.torch import save_file

            state = {k: v for k, v in reference.state_dict().items() if not (case.tied and k == "lm_head.weight")}
            checkpoint = Path(tempfile.mkdtemp()) / "model.safetensors"
            save_file(state, str(checkpoint))
        # The production loader: each rank reads only its own slice of every tensor.
        load_checkpoint(model, Path(checkpoint))
        for name, param in model.named_parameters():
            torch.testing.assert_close(_full(param), reference.get_parameter(name), rtol=0, atol=0, msg=name)

        tokens_BT, labels_BT, positions_BT, document_ids_BT = _batch(case.vocab_size)
        num_targets = int((labels_BT != -100).sum())
        rows = slice(gangs.dp.rank * B // gangs.dp.size, (gangs.dp.rank + 1) * B // gangs.dp.size)
        # SGD, not Adam: Adam turns float noise in near-zero gradients into full-size steps.
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        for step in range(STEPS):
            ref_loss = _loss_sum(reference, "logits", tokens_BT, labels_BT, positions_BT, document_ids_BT) / num_targets
            ref_loss.backward()

            local = [x[rows] for x in (tokens_BT, labels_BT, positions_BT, document_ids_BT)]
            # Loss-parallel cross-entropy and its backward both need the context.
            with loss_parallel() if case.loss == "loss_parallel" else contextlib.nullcontext():
                loss_sum = _loss_sum(model, case.loss, *local)
                # dp gradients are averaged, so each rank scales by dp / global targets.
                (loss_sum * gangs.dp.size / num_targets).backward()
            loss_sum = _full(loss_sum)
            total = loss_sum.detach().clone()
            gangs.dp.all_reduce(total)
            torch.testing.assert_close(total / num_targets, ref_loss.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, step=step: f"loss at step {step}: {m}")
            for name, param in model.named_parameters():
                torch.testing.assert_close(_full(param.grad), reference.get_parameter(name).grad, rtol=1e-4,
                                           atol=1e-5, msg=lambda m, name=name, step=step: f"grad of {name} at step {step}: {m}")
            ref_opt.step(), ref_opt.zero_grad()
            opt.step(), opt.zero_grad()

        exported = dict(iter_full_state_dict(model))
        if gangs.is_main:
            expected = reference.state_dict()
            assert list(exported) == list(expected)
            for name, tensor in exported.items():
                assert tensor.device.type == "cpu" and not isinstance(tensor, DTensor)
                torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert exported == {}
        gangs.root.barrier()  # let every rank finish its collectives before teardown
    finally:
        teardown_gangs(gangs)


def test_fsdp_dp2():
    run_distributed(_train_and_compare, 2, Case())


def test_ddp_dp2():
    run_distributed(_train_and_compare, 2, Case(data_parallelism="ddp"))


def test_tp2_logits():
    run_distributed(_train_and_compare, 2, Case(tp=2, loss="logits", activation_checkpointing="full"))


def test_tp2_tied_loss_parallel():
    run_distributed(_train_and_compare, 2, Case(tp=2, tied=True, loss="loss_parallel"))


def test_tp2_sequence_parallel_tied():
    # Norms on sequence shards, attention/MLP inputs all-gathered: same losses and gradients.
    run_distributed(_train_and_compare, 2, Case(tp=2, tied=True, sequence_parallel=True))


def test_fsdp2_x_tp2_tied_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    reference = Llama(dataclasses.replace(CONFIG, tie_embeddings=True))
    reference.init_weights(seed=0)
    # HF layout: a tied lm_head is not stored.
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    case = Case(tp=2, tied=True, loss="logits", activation_checkpointing="selective",
                safetensors=str(tmp_path / "model.safetensors"))
    run_distributed(_train_and_compare, 4, case)


def test_fsdp2_selective_checkpointing():
    # FSDP's hooks must stay outside the recomputed region.
    run_distributed(_train_and_compare, 2, Case(activation_checkpointing="selective"))


def test_hsdp_2x2_uneven_shards():
    # 63 vocabulary rows split over 2 shards: FSDP pads the second one.
    run_distributed(_train_and_compare, 4, Case(replicas=2, activation_checkpointing="full", vocab_size=63))


def test_layout_errors():
    for key, bad in [("n_heads", dict(n_heads=3, n_kv_heads=1, dim=48)), ("ffn_dim", dict(ffn_dim=65)),
                     ("vocab_size", dict(vocab_size=65))]:
        config = dataclasses.replace(CONFIG, **bad)
        with pytest.raises(ConfigError, match=f"tensor_parallel_size=2 does not divide the model's {key}"):
            check_parallel_layout(config, tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="n_kv_heads"):
        check_parallel_layout(CONFIG, tensor_parallel_size=4)
    with pytest.raises(ConfigError, match="data_parallelism=ddp cannot be combined"):
        check_parallel_layout(CONFIG, tensor_parallel_size=2, data_parallelism="ddp")
    with pytest.raises(ConfigError, match="activation_checkpointing='some'"):
        check_parallel_layout(CONFIG, tensor_parallel_size=1, activation_checkpointing="some")


@pytest.mark.parametrize("activation_checkpointing,compile", [("full", False), ("selective", False), ("elementwise", False),
                                                             ("selective", True)])
def test_single_process_compile_and_checkpointing(activation_checkpointing, compile):
    gangs = setup_gangs(device="cpu", env={})
    reference = Llama(CONFIG)
    reference.init_weights(seed=0)
    model = Llama(CONFIG)
    model.load_state_dict(reference.state_dict())
    parallelize_model(model, gangs, activation_checkpointing=activation_checkpointing, compile=compile)
    # Composable checkpointing and module.compile() leave parameter names as HF's.
    assert list(model.state_dict()) == list(reference.state_dict())
    calls = []
    # A pre-hook: recomputation stops early, once it has what backward needs.
    model.model.layers[0].input_layernorm.register_forward_pre_hook(lambda *_: calls.append(1))
    tokens_BT, labels_BT, positions_BT, document_ids_BT = _batch(CONFIG.vocab_size)
    for m in (reference, model):
        _loss_sum(m, "chunked", tokens_BT, labels_BT, positions_BT, document_ids_BT).backward()
    if not compile:  # inside a compiled block Python hooks are traced, not called
        assert len(calls) == 2, "the block was not recomputed in backward"
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
