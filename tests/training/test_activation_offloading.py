"""Activation offloading hands backward its saved tensors with their sizes and strides (CPU; the CUDA path
makes its copies with the same `strided_copy`)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ft.training.activation_offloading import ActivationOffloading, is_dense, strided_copy


def base_BHTD() -> torch.Tensor:
    return torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(0))


DENSE = {
    "contiguous": lambda: base_BHTD(),
    "transposed": lambda: base_BHTD().transpose(1, 2),
    "permuted": lambda: base_BHTD().permute(2, 0, 3, 1),
}
NOT_DENSE = {
    "slice": lambda: base_BHTD()[:, :, :, :8],
    "expanded": lambda: base_BHTD()[:, :1].expand(2, 4, 8, 16),
}


@pytest.mark.parametrize("name", list(DENSE))
def test_dense_tensors_come_back_from_the_host_with_their_strides(name):
    tensor = DENSE[name]()
    assert is_dense(tensor)
    assert strided_copy(tensor, torch.device("cpu")).stride() == tensor.stride()
    hooks = ActivationOffloading(min_bytes=0)
    packed = hooks.pack_hook(tensor)
    back = hooks.unpack_hook(packed)
    assert hooks.offloaded_bytes == tensor.numel() * tensor.element_size()
    assert back.data_ptr() != tensor.data_ptr()  # a copy, not the tensor itself
    assert torch.equal(back, tensor) and back.shape == tensor.shape and back.stride() == tensor.stride()


@pytest.mark.parametrize("name", list(NOT_DENSE))
def test_views_with_gaps_or_repeats_stay_where_they_are(name):
    tensor = NOT_DENSE[name]()
    assert not is_dense(tensor)
    hooks = ActivationOffloading(min_bytes=0)
    back = hooks.unpack_hook(hooks.pack_hook(tensor))
    assert back is tensor and hooks.offloaded_bytes == 0


class Attention(nn.Module):
    """Saves q, k, v as transposed views (as the model's attention does) and a transposed input of a matmul."""

    def __init__(self, dim: int = 16, heads: int = 4, seq: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.mix_TT = nn.Parameter(torch.randn(seq, seq) / seq)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, H, T, K), stride (.., K, .., 1)
                   for t in self.qkv(x_BTD).split(D, dim=-1))
        y_BTD = F.scaled_dot_product_attention(q.sin(), k.cos(), v.sin(), is_causal=True)
        y_BTD = y_BTD.transpose(1, 2).reshape(B, T, D)
        mixed_BDT = x_BTD.exp().transpose(1, 2) @ self.mix_TT  # saves a (B, D, T) view of a (B, T, D) tensor
        return self.out(y_BTD) + mixed_BDT.transpose(1, 2)


def gradients(model: nn.Module, x: torch.Tensor, *, offload: bool) -> list[torch.Tensor]:
    hooks = ActivationOffloading(min_bytes=0)
    if offload:
        with hooks:
            loss = model(x).square().mean()
        assert hooks.offloaded_bytes > 0
    else:
        loss = model(x).square().mean()
    loss.backward()
    return [p.grad for p in model.parameters()]


def test_gradients_through_transposed_saved_tensors_match_without_offloading():
    torch.manual_seed(0)
    model, x = Attention(), torch.randn(2, 8, 16)
    plain = gradients(model, x, offload=False)
    offloaded = gradients(copy.deepcopy(model), x, offload=True)
    for a, b in zip(plain, offloaded, strict=True):
        assert torch.equal(a, b)


def test_a_compiled_block_backward_accepts_the_offloaded_tensors():
    # A compiled backward asserts the strides of what its forward saved; contiguous copies of q, k, v fail here.
    torch.manual_seed(0)
    model, x = Attention(), torch.randn(2, 8, 16)
    plain = gradients(model, x, offload=False)
    compiled = copy.deepcopy(model)
    compiled.compile()
    offloaded = gradients(compiled, x, offload=True)
    for a, b in zip(plain, offloaded, strict=True):
        torch.testing.assert_close(a, b)
