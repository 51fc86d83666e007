"""Pipeline stages (`ft.models.pipeline`, `ft.training.pipeline_step`) on gloo processes.

Each worker trains the tiny tied model (random init, float32) for two AdamW steps
through its pipeline and also, alone, the whole model on the same micro-batches with
`accumulate_gradients`: the step losses, grad norms and the weights each rank holds
must agree (relative 1e-6 on losses), on pp=2, pp=2 x dp=2 and pp=2 x tp=2. Also:
stage splits keep the full model's names, and the layouts that cannot work fail
before any work.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dist_launcher import run_distributed
from ft.errors import ConfigError
from ft.models.llama.model import get_llama_arch
from ft.models.pipeline import check_pipeline_layout, pipeline_stages, split_layers

LOSS_RTOL = 1e-6
# Weights after two AdamW steps: pipeline stages alone reproduce them to ~1e-6; TP splits
# the matmuls' float32 sums, and Adam's first steps turn those ~1e-6 relative gradient
# differences into ~1e-4 for near-zero gradients (tp=2 without stages gives the same).
WEIGHT_ATOL = {"pp": 2e-5, "tp": 2e-4}


def _config():
    return dataclasses.replace(get_llama_arch("ft_tiny"), max_seq_len=64)


def _batches(n: int, seed: int, B: int = 2, T: int = 32):
    from ft.data.packing import Batch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(3, 1000, (B, T), generator=g)
        labels = torch.roll(tokens, -1, dims=1)
        labels[:, : T // 4] = -100
        labels[:, -1] = -100
        docs = torch.zeros(B, T, dtype=torch.int64)
        docs[:, T // 2:] = 1  # two documents per row
        positions = torch.cat([torch.arange(T // 2), torch.arange(T - T // 2)]).expand(B, T).clone()
        out.append(Batch(tokens_BT=tokens, labels_BT=labels, positions_BT=positions, document_ids_BT=docs,
                         num_target_tokens=int((labels != -100).sum()), num_tokens=B * T, num_examples=2 * B))
    return out


def _reference(config, steps, dp_size: int):
    """One process: the whole model, every dp rank's micro-batches accumulated."""
    from ft.gang import Gang, Gangs
    from ft.models.build import create_model
    from ft.training.optim import build_optimizer, build_scheduler
    from ft.training.step import accumulate_gradients, next_token_loss, optimizer_step
    from ft.training.step_stats import StepStats

    single = Gang(0, 1, None)
    gangs = Gangs(root=single, dp=single, tp=single, device=torch.device("cpu"))
    model = create_model(config, device="cpu", seed=7)
    optimizer = build_optimizer(model, learning_rate=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    scheduler = build_scheduler(optimizer, schedule="constant", warmup_steps=0, max_num_steps=10, final_lr_scale=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses, norms = [], []
    import contextlib

    for step_batches in steps:
        batches = [b for rank_batches in step_batches for b in rank_batches]
        loss = accumulate_gradients(model, batches, gangs=gangs, autocast=contextlib.nullcontext(), scaler=scaler,
                                    loss_fn=next_token_loss(16), stats=StepStats.zero(torch.device("cpu")))
        norms.append(float(optimizer_step(model, optimizer, scheduler, scaler, max_grad_norm=1.0)))
        losses.append(float(loss))
    return model, losses, norms


def _pipeline_worker(rank: int, pp: int, tp: int, schedules: list[str], micro: int, tmp: str) -> None:
    from ft.gang import setup_gangs

    from pathlib import Path

    from ft.models.hf_export import save_hf_state_dict

    config = _config()
    # The reference's initial weights as a checkpoint: FSDP's sharded random init on a
    # CPU mesh draws differently, a loaded checkpoint is the same on every layout.
    start = Path(tmp) / f"start_rank{rank}"
    save_hf_state_dict(list(_reference(config, [], 1)[0].state_dict().items()), config, start, dtype=torch.float32)
    with setup_gangs(device="cpu", pipeline_parallel_size=pp, tensor_parallel_size=tp) as gangs:
        for schedule in schedules:
            _check_schedule(config, gangs, schedule, micro, start)


def _check_schedule(config, gangs, schedule: str, micro: int, start) -> None:
    import contextlib

    from ft.models.build import create_model
    from ft.models.parallelize import iter_full_state_dict, parallelize_model
    from ft.training.optim import build_optimizer, build_scheduler
    from ft.training.pipeline_step import PipelineRunner
    from ft.training.step import optimizer_step
    from ft.training.step_stats import StepStats

    pp = gangs.pp.size

    def parallelize(full):
        rank_model = pipeline_stages(full, pp_rank=gangs.pp.rank, pp_size=pp, schedule=schedule)
        for view in rank_model.stages:
            parallelize_model(view, gangs)
        return rank_model

    model = create_model(config, device="cpu", checkpoint=start, parallelize=parallelize)
    optimizer = build_optimizer(model, learning_rate=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    scheduler = build_scheduler(optimizer, schedule="constant", warmup_steps=0, max_num_steps=10,
                                final_lr_scale=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    runner = PipelineRunner(model, gangs, schedule=schedule, micro_batches=micro, loss_chunk_size=16)
    dp = gangs.dp.size
    steps = [[_batches(micro, seed=100 * s + r) for r in range(dp)] for s in range(2)]
    losses, norms = [], []
    for step_batches in steps:
        stats = StepStats.zero(gangs.device)
        loss = runner.step(step_batches[gangs.dp.rank], autocast=contextlib.nullcontext(), stats=stats)
        gangs.dp.all_reduce(loss)
        norm = optimizer_step(model, optimizer, scheduler, scaler, max_grad_norm=1.0, clip=runner.clip_grad_norm)
        losses.append(float(loss))
        norms.append(float(norm))
    valid = runner.validate(_batches(2, seed=999), autocast=contextlib.nullcontext())
    held = dict(iter_full_state_dict(model, rank0_only=False))

    reference, ref_losses, ref_norms = _reference(config, steps, dp)
    assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL, abs=0), (losses, ref_losses)
    assert norms == pytest.approx(ref_norms, rel=1e-5), (norms, ref_norms)
    want = dict(reference.state_dict())
    assert held and set(held) <= set(want)
    atol = WEIGHT_ATOL["tp" if gangs.tp.size > 1 else "pp"]
    for name, tensor in held.items():
        torch.testing.assert_close(tensor, want[name], atol=atol, rtol=0, msg=name)
    # validation: this rank's share only (dp ranks see the same batches here), summed over dp
    from ft.training.step import next_token_loss

    with torch.no_grad():
        batches = _batches(2, seed=999)
        ref_valid = sum(float(next_token_loss(16)(reference, b, torch.device("cpu"))) for b in batches) / sum(
            b.num_target_tokens for b in batches)
    assert valid["loss"] == pytest.approx(ref_valid, rel=LOSS_RTOL)


def test_pp2_matches_one_process(tmp_path):
    run_distributed(_pipeline_worker, 2, 2, 1, ["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"], 2,
                    str(tmp_path))


def test_pp2_x_dp2_matches_one_process(tmp_path):
    run_distributed(_pipeline_worker, 4, 2, 1, ["1f1b"], 2, str(tmp_path))


def test_stages_keep_the_full_model_names():
    from ft.models.family import build_meta_model

    config = _config()
    full_names = set(build_meta_model(config, torch.float32).state_dict())
    names = set()
    for r in range(2):
        part = pipeline_stages(build_meta_model(config, torch.float32), pp_rank=r, pp_size=2, schedule="1f1b")
        assert set(part.state_dict()) <= full_names
        names |= set(part.state_dict())
    assert names == full_names
    assert split_layers(5, 2) == [[0, 1, 2], [3, 4]]


@pytest.mark.parametrize("pp, schedule, micro, message", [
    (8, "1f1b", 8, "only 4 layers"),
    (4, "interleaved_1f1b", 4, "makes 8 stages"),
    (2, "1f1b", 1, "gradient_accumulation >= 2"),
    (2, "nope", 2, "is not one of"),
])
def test_impossible_pipeline_layouts(pp, schedule, micro, message):
    with pytest.raises(ConfigError, match=message):
        check_pipeline_layout(_config(), pipeline_parallel_size=pp, schedule=schedule, micro_batches=micro)


def test_world_not_divisible_by_stages():
    from ft.gang import check_layout

    with pytest.raises(ConfigError, match="pipeline_parallel_size=3 does not divide the 4 processes"):
        check_layout(4, tensor_parallel_size=1, replicas=1, pipeline_parallel_size=3)
    assert check_layout(8, tensor_parallel_size=2, replicas=1, pipeline_parallel_size=2) == 2


def test_pp2_x_tp2_matches_one_process(tmp_path):
    run_distributed(_pipeline_worker, 4, 2, 2, ["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"], 2,
                    str(tmp_path))
