"""`activation_checkpointing_blocks`: only the first N blocks run under activation
checkpointing, and the gradients are bitwise those of no checkpointing and of every
block checkpointed (recomputation repeats the same CPU kernels)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ft.errors import ConfigError
from ft.gang import setup_gangs
from ft.models.llama.model import Llama, LlamaConfig
from ft.models.parallelize import check_parallel_layout, parallelize_model
from ft.training.loss import cross_entropy_sum

CONFIG = LlamaConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


def _gradients(mode: str, blocks: int | None) -> tuple[dict[str, torch.Tensor], Llama]:
    model = Llama(CONFIG)
    model.init_weights(seed=0)
    parallelize_model(model, setup_gangs(device="cpu", env={}), activation_checkpointing=mode,
                      activation_checkpointing_blocks=blocks)
    g = torch.Generator().manual_seed(1)
    tokens_BT = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=g)
    labels_BT = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=g)
    cross_entropy_sum(model(tokens_BT), labels_BT).backward()
    return {name: p.grad for name, p in model.named_parameters()}, model


def _is_checkpointed(layer: torch.nn.Module) -> bool:
    # parallelize_model replaces a checkpointed block's bound forward by a plain function.
    return "forward" in vars(layer) and vars(layer)["forward"].__name__ == "checkpointed_forward"


@pytest.mark.parametrize("mode", ["selective", "elementwise", "full"])
def test_first_n_blocks_checkpointed_give_the_same_gradients_bitwise(mode):
    plain, _ = _gradients("none", None)
    every, _ = _gradients(mode, None)
    for blocks in (0, 1, CONFIG.n_layers):
        grads, model = _gradients(mode, blocks)
        assert [_is_checkpointed(layer) for layer in model.model.layers] == [i < blocks for i in range(CONFIG.n_layers)]
        for name, grad in grads.items():
            assert torch.equal(grad, plain[name]), (mode, blocks, name)
            assert torch.equal(grad, every[name]), (mode, blocks, name)


def test_unset_blocks_checkpoint_every_block():
    _, model = _gradients("selective", None)
    assert all(_is_checkpointed(layer) for layer in model.model.layers)
    _, model = _gradients("none", None)
    assert not any(_is_checkpointed(layer) for layer in model.model.layers)


def test_blocks_out_of_range_or_without_checkpointing_are_errors():
    with pytest.raises(ConfigError, match=r"'activation_checkpointing_blocks' must be between 0 and the model's 3 "
                                          r"blocks, or null for every block, got 4"):
        check_parallel_layout(CONFIG, tensor_parallel_size=1, activation_checkpointing="full",
                              activation_checkpointing_blocks=4)
    with pytest.raises(ConfigError, match="'activation_checkpointing_blocks' must be .* got -1"):
        check_parallel_layout(CONFIG, tensor_parallel_size=1, activation_checkpointing="full",
                              activation_checkpointing_blocks=-1)
    with pytest.raises(ConfigError, match="'activation_checkpointing_blocks' .2. needs activation_checkpointing="):
        check_parallel_layout(CONFIG, tensor_parallel_size=1, activation_checkpointing_blocks=2)
    check_parallel_layout(dataclasses.replace(CONFIG, n_layers=4), tensor_parallel_size=1,
                          activation_checkpointing="selective", activation_checkpointing_blocks=4)
