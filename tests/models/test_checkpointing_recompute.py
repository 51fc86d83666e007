"""What each activation checkpointing mode recomputes in backward: `full` every
matmul of a block backward needs, `selective` every second one, `elementwise` none (only the
norms, RoPE and SwiGLU's product), counted as the matmuls backward runs beyond those
of no checkpointing. The gradients are the same in every mode."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ft.errors import ConfigError
from ft.gang import setup_gangs
from ft.models.llama.model import Llama, LlamaConfig
from ft.models.parallelize import check_parallel_layout, parallelize_model
from ft.training.loss import cross_entropy_sum

CONFIG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
# q, k, v, o, gate, up, down: full checkpointing recomputes all but down, whose output backward
# never reads (torch's checkpoint stops the recompute once the saved tensors are back).
FULL_RECOMPUTE_PER_BLOCK = 6


class _CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _backward_matmuls(mode: str) -> tuple[int, dict[str, torch.Tensor]]:
    model = Llama(CONFIG)
    model.init_weights(seed=0)
    parallelize_model(model, setup_gangs(device="cpu", env={}), activation_checkpointing=mode)
    g = torch.Generator().manual_seed(1)
    tokens_BT = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=g)
    labels_BT = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=g)
    loss = cross_entropy_sum(model(tokens_BT), labels_BT)
    with _CountMatmuls() as counter:
        loss.backward()
    return counter.count, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode,recomputed_per_block", [("elementwise", 0), ("selective", 3), ("full", FULL_RECOMPUTE_PER_BLOCK)])
def test_each_mode_recomputes_its_share_of_the_matmuls(mode, recomputed_per_block):
    plain_count, plain_grads = _backward_matmuls("none")
    count, grads = _backward_matmuls(mode)
    assert count - plain_count == recomputed_per_block * CONFIG.n_layers
    for name, grad in grads.items():
        assert torch.equal(grad, plain_grads[name]), (mode, name)


def test_an_unknown_mode_lists_the_modes():
    with pytest.raises(ConfigError, match=r"activation_checkpointing='some' is not one of 'none', 'full', "
                                          r"'selective', 'elementwise'"):
        check_parallel_layout(CONFIG, tensor_parallel_size=1, activation_checkpointing="some")
