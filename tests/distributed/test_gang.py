"""Launch detection (torchrun, Slurm, single), layout errors, and gang collectives on gloo."""

from __future__ import annotations

import pytest
import torch

from dist_launcher import run_distributed
from ft.errors import ConfigError
from ft.gang import check_layout, detect_launch, expand_slurm_nodelist, setup_gangs, teardown_gangs


def test_expand_slurm_nodelist():
    assert expand_slurm_nodelist("gpu[01-04,07],cpu3") == ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]
    assert expand_slurm_nodelist("node7") == ["node7"]
    assert expand_slurm_nodelist("a[8-10]") == ["a8", "a9", "a10"]
    assert expand_slurm_nodelist("rack[1-2]-n[01-02]") == ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]
    with pytest.raises(ConfigError, match="node list"):
        expand_slurm_nodelist("gpu[01-04")


SRUN_ENV = {
    "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "16",
    "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_NODELIST": "gpu[07-08],gpu11",
}


def test_detect_slurm():
    info = detect_launch(SRUN_ENV)
    assert info.kind == "slurm"
    assert (info.rank, info.world_size, info.local_rank) == (5, 16, 5)
    assert info.master_addr == "gpu07"
    assert info.master_port == 10_000 + 123456 % 20_000
    # The step's own node list wins over the job's; MASTER_PORT / MASTER_ADDR override.
    info = detect_launch({**SRUN_ENV, "SLURM_STEP_NODELIST": "gpu08,gpu11", "MASTER_PORT": "29999"})
    assert (info.master_addr, info.master_port) == ("gpu08", 29999)


def test_detect_slurm_single_task_and_batch_script():
    assert detect_launch({**SRUN_ENV, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}).kind == "single"
    # The sbatch script itself (no step): one process even if the job asked for 16 tasks.
    batch = {k: v for k, v in SRUN_ENV.items() if k not in ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS")}
    assert detect_launch({**batch, "SLURM_PROCID": "0"}).kind == "single"


def test_detect_torchrun_wins_over_slurm():
    env = {"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
           "MASTER_ADDR": "host0", "MASTER_PORT": "29500", **SRUN_ENV}
    info = detect_launch(env)
    assert (info.kind, info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port) == (
        "torchrun", 3, 8, 1, "host0", 29500)
    assert detect_launch({**env, "WORLD_SIZE": "1", "RANK": "0"}).kind == "single"
    with pytest.raises(ConfigError, match="MASTER_PORT"):
        detect_launch({k: v for k, v in env.items() if k != "MASTER_PORT"})


def test_detect_single():
    assert detect_launch({}).kind == "single"
    assert detect_launch({"PATH": "/bin"}) == detect_launch({})


def test_layout_errors_name_the_key():
    assert check_layout(8, tensor_parallel_size=2, replicas=2) == 4
    with pytest.raises(ConfigError, match="tensor_parallel_size=3"):
        check_layout(8, tensor_parallel_size=3, replicas=1)
    with pytest.raises(ConfigError, match="fsdp_replicas=4"):
        check_layout(12, tensor_parallel_size=2, replicas=4)
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        setup_gangs(device="cpu", tensor_parallel_size=2, env={})  # one process cannot hold tp=2


def test_single_process_gangs():
    with setup_gangs(device="cpu", env={}) as gangs:
        assert gangs.is_main and gangs.mesh is None and gangs.device == torch.device("cpu")
        assert (gangs.root.size, gangs.dp.size, gangs.tp.size) == (1, 1, 1)
        t = torch.tensor([3.0])
        gangs.dp.all_reduce(t, op="max")
        assert t.item() == 3.0
        assert gangs.root.all_gather_object({"a": 1}) == [{"a": 1}]
        assert gangs.root.broadcast_object("x") == "x"
        gangs.root.barrier()


def _collectives(rank: int, tp: int, replicas: int) -> None:
    gangs = setup_gangs(device="cpu", tensor_parallel_size=tp, replicas=replicas)
    try:
        world = gangs.root.size
        assert gangs.root.rank == rank and gangs.is_main == (rank == 0)
        assert gangs.tp.size == tp and gangs.dp.size == world // tp
        # tp innermost: consecutive ranks form a tp group.
        assert gangs.tp.rank == rank % tp and gangs.dp.rank == rank // tp
        if replicas > 1:
            assert tuple(gangs.dp_mesh.shape) == (replicas, world // tp // replicas)
        t = torch.tensor([float(rank)])
        gangs.root.all_reduce(t)
        assert t.item() == sum(range(world))
        t = torch.tensor([float(rank)])
        gangs.tp.all_reduce(t, op="max")
        assert t.item() == (rank // tp) * tp + tp - 1
        t = torch.tensor([float(rank)])
        gangs.dp.all_reduce(t, op="min")
        assert t.item() == rank % tp
        t = torch.tensor([float(gangs.dp.rank)])
        gangs.dp.all_reduce(t, op="mean")
        assert t.item() == (gangs.dp.size - 1) / 2
        assert gangs.dp.all_gather_object(rank) == [r * tp + rank % tp for r in range(gangs.dp.size)]
        assert gangs.tp.broadcast_object(f"from {rank}", src=1 if tp > 1 else 0) == f"from {(rank // tp) * tp + (1 if tp > 1 else 0)}"
        gangs.root.barrier()
    finally:
        teardown_gangs(gangs, synchronize=False)
    assert not torch.distributed.is_initialized()


def test_gangs_dp2():
    run_distributed(_collectives, 2, 1, 1)


def test_gangs_dp2_tp2():
    run_distributed(_collectives, 4, 2, 1)


def test_gangs_hsdp_2x2():
    run_distributed(_collectives, 4, 1, 2)
