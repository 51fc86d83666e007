"""Loading into a sharded model (DTensor parameters, as FSDP2/TP leave them): each
rank reads only its own slice from disk. Two gloo processes on CPU."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ft.models import build_model
from ft.models.hf_export import save_hf_model

pytest.importorskip("torch.distributed.tensor")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, directory: str, arch: str) -> None:
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from ft.models.checkpoint import load_checkpoint
    from ft.models.llama.model import Llama, get_llama_arch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        with torch.device("meta"):
            model = Llama(get_llama_arch(arch))
        # Shard like FSDP2 (dim 0, uneven where sizes are odd) or TP (dim 1), replicate norms.
        for i, (name, module) in enumerate(model.named_modules()):
            for pname, param in list(module.named_parameters(recurse=False)):
                placement = Replicate() if param.ndim == 1 else Shard(i % 2)
                empty = torch.empty(param.shape)
                module.register_parameter(pname, nn.Parameter(distribute_tensor(empty, mesh, [placement])))
        model.tie_weights()
        load_checkpoint(model, directory)
        source = build_model(arch, device="cpu", seed=0)
        for (name, p), q in zip(model.named_parameters(), source.parameters()):
            assert torch.equal(p.full_tensor(), q), name
        dist.barrier()  # every rank done with its collectives before the group goes
    finally:
        dist.destroy_process_group()
    # Skip interpreter finalization, where gloo's threads occasionally abort under load.
    os._exit(0)


@pytest.mark.parametrize("arch", ["llama_debug", "llama_debug_tied"])
def test_load_into_dtensor_shards(tmp_path, arch):
    source = build_model(arch, device="cpu", seed=0)
    save_hf_model(source, tmp_path, dtype=torch.float32, max_shard_size_bytes=50_000)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), arch), nprocs=2, join=True)
