"""Random initialisation (a model with no checkpoint) gives the same weights on any
layout: FSDP, TP and DDP on 2 gloo processes start from what one process initialises,
through the one build path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from dist_launcher import run_distributed  # noqa: E402
from ft.gang import setup_gangs, teardown_gangs
from ft.models import create_model, find_arch
from ft.models.parallelize import parallelize_model

ARCH = "llama_debug_tied"


def _compare_with_one_process(rank: int, tp: int, data_parallelism: str) -> None:
    config = find_arch(ARCH)[1]
    gangs = setup_gangs(device="cpu", tensor_parallel_size=tp)
    try:
        model = create_model(config, device="cpu", seed=7,
                             parallelize=lambda m: parallelize_model(m, gangs, data_parallelism=data_parallelism))
        reference = create_model(config, device="cpu", seed=7)
        expected = dict(reference.named_parameters())
        from torch.distributed.tensor import DTensor

        sharded = 0
        for name, param in model.named_parameters():
            full = param.full_tensor() if isinstance(param, DTensor) else param
            sharded += isinstance(param, DTensor)
            key = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
            assert torch.equal(full.detach(), expected[key].detach()), name
        assert sharded > 0 or data_parallelism == "ddp"
        gangs.root.barrier()
    finally:
        teardown_gangs(gangs)


@pytest.mark.parametrize("tp, data_parallelism", [(1, "fsdp"), (2, "fsdp"), (1, "ddp")])
def test_random_init_does_not_depend_on_the_layout(tp, data_parallelism):
    run_distributed(_compare_with_one_process, 2, tp, data_parallelism)
