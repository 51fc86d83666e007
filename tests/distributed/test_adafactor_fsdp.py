"""ft's Adafactor on FSDP2-sharded (DTensor) parameters steps as it does on the unsharded
model with the same gradients, on 2 gloo processes (that it steps as
torch's Adafactor is tests/training/test_adafactor.py; torch's own fails on these
shards: an in-place op on a partial norm)."""

from __future__ import annotations

import torch

from tests.distributed.dist_launcher import run_distributed


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(38, 12), torch.nn.Linear(12, 7), torch.nn.LayerNorm(7))


def _worker(rank: int) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from ft.training.adafactor import Adafactor

    dist.init_process_group("gloo")
    try:
        sharded, plain = _model(), _model()
        fully_shard(sharded)
        ours = Adafactor(sharded.parameters(), lr=1e-2, weight_decay=0.1)
        reference = Adafactor(plain.parameters(), lr=1e-2, weight_decay=0.1)  # whole tensors, as on shards
        for step in range(6):  # the same gradients on both sides
            generator = torch.Generator().manual_seed(step)
            for p, q in zip(sharded.parameters(), plain.parameters()):
                q.grad = torch.randn(q.shape, generator=generator) * (1 + step)
                p.grad = distribute_tensor(q.grad, p.device_mesh, p.placements)
            ours.step()
            reference.step()
        for got, want in zip(sharded.parameters(), plain.parameters()):
            torch.testing.assert_close(got.full_tensor(), want, rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_adafactor_on_fsdp_shards_steps_as_on_the_whole_model():
    run_distributed(_worker, 2)
