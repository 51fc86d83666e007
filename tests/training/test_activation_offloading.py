"""Activation offloading hands backward its saved tensors with their sizes and strides (CPU; the CUDA path
makes its copies with the same `strided_copy`)."""

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ft.gang import setup_gangs
from ft.lora import LoraConfig
from ft.lora.apply import apply_lora
from ft.lora.layers import quantize_frozen_linears
from ft.models.llama.model import Llama, LlamaConfig
from ft.models.parallelize import parallelize_model
from ft.training.activation_offloading import ActivationOffloading, is_dense, strided_copy
from ft.training.optimizers import OptimizerSettings, build_optimizer
from tests.distributed.dist_launcher import run_distributed


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


# Full activation checkpointing: the blocks keep only their inputs, and those go to the host.

LLAMA = LlamaConfig(vocab_size=64, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)
B, T = 2, 16
BLOCK_INPUT_BYTES = B * T * LLAMA.dim * 4


def lora_llama(*, nf4: bool = False, compile: bool = False, gangs=None) -> nn.Module:
    """A LoRA model as the recipe builds it (frozen embedding, so block 0's input needs no
    gradient; NF4 after parallelizing), float32, every block under full checkpointing;
    adapters' B non-zero so A trains too."""
    torch.manual_seed(0)
    model = apply_lora(Llama(LLAMA), LoraConfig(enabled=True, rank=4, alpha=8.0), base_dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    model = parallelize_model(model, gangs or setup_gangs(device="cpu"), activation_checkpointing="full",
                              compile=compile)
    if nf4:
        pytest.importorskip("torchao")
        quantize_frozen_linears(model, dtype=torch.float32)
    return model


def loss_of(model: nn.Module, seed: int = 1) -> torch.Tensor:
    tokens_BT = torch.randint(0, LLAMA.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))
    return model(tokens_BT).square().mean()


def track_block_inputs(model: nn.Module) -> list[weakref.ref]:
    inputs: list[weakref.ref] = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda module, args: inputs.append(weakref.ref(args[0])))
    return inputs


class WatchedOffloading(ActivationOffloading):
    """Notes, for each block input it offloads, whether backward found it prefetched."""

    def __init__(self, block_inputs: list[weakref.ref], **kwargs) -> None:
        super().__init__(**kwargs)
        self.block_inputs = block_inputs
        self.block_records: list = []
        self.found_prefetched: list[bool] = []  # in backward's order

    def _pack(self, tensor):
        packed = super()._pack(tensor)
        if any(ref() is tensor for ref in self.block_inputs):
            self.block_records.append(packed)
        return packed

    def _unpack(self, packed):
        if any(packed is record for record in self.block_records):
            self.found_prefetched.append(packed.prefetched is not None)
        return super()._unpack(packed)


@pytest.mark.parametrize("nf4", [False, True], ids=["lora", "qlora"])
def test_full_checkpointing_offloads_every_block_input_and_gives_the_same_gradients(nf4):
    plain, offloaded = lora_llama(nf4=nf4), lora_llama(nf4=nf4)
    kept, dropped = track_block_inputs(plain), track_block_inputs(offloaded)
    plain_loss = loss_of(plain)
    hooks = WatchedOffloading(dropped, min_bytes=BLOCK_INPUT_BYTES)
    with hooks:
        loss = loss_of(offloaded)
    # Without the hooks every checkpointed block holds its input until backward; with them, none does.
    assert len(kept) == len(dropped) == LLAMA.n_layers
    assert all(ref() is not None for ref in kept) and all(ref() is None for ref in dropped)
    assert hooks.offloaded_bytes >= LLAMA.n_layers * BLOCK_INPUT_BYTES  # and what the output layer saves
    plain_loss.backward()
    loss.backward()
    # Backward brought each block's input back ahead of its recompute (the last one's during the
    # output layer's backward), not on demand.
    assert len(hooks.block_records) == LLAMA.n_layers
    assert hooks.found_prefetched == [True] * LLAMA.n_layers
    trained = [(name, p) for name, p in offloaded.named_parameters() if p.requires_grad]
    for (name, a), b in zip(trained, (p for p in plain.parameters() if p.requires_grad), strict=True):
        assert torch.equal(a.grad, b.grad), name
    assert all(p.grad.abs().sum() > 0 for name, p in trained if ".layers.0." in name)  # block 0's adapters train


def test_full_checkpointing_offloads_with_the_optimizer_in_backward():
    settings = OptimizerSettings(name="adamw", learning_rate=1e-2, in_backward=True)
    plain, offloaded = lora_llama(), lora_llama()
    optimizers = [build_optimizer(model, settings) for model in (plain, offloaded)]  # step in grad hooks
    loss_of(plain).backward()
    hooks = ActivationOffloading(min_bytes=BLOCK_INPUT_BYTES)
    with hooks:
        loss = loss_of(offloaded)
    loss.backward()
    assert hooks.offloaded_bytes >= LLAMA.n_layers * BLOCK_INPUT_BYTES
    for (name, a), b in zip(offloaded.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(offloaded.model.layers[0].self_attn.q_proj.lora_A.weight,
                           lora_llama().model.layers[0].self_attn.q_proj.lora_A.weight)  # it was stepped
    del optimizers


def test_compiled_checkpointed_blocks_offload_their_inputs():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    plain, offloaded = lora_llama(compile=True), lora_llama(compile=True)
    loss_of(plain).backward()
    hooks = ActivationOffloading(min_bytes=BLOCK_INPUT_BYTES)
    with hooks:
        loss = loss_of(offloaded)
    loss.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the blocks ran compiled, not skipped
    assert hooks.offloaded_bytes >= LLAMA.n_layers * BLOCK_INPUT_BYTES
    assert hooks.prefetched_bytes >= (LLAMA.n_layers - 1) * BLOCK_INPUT_BYTES
    for (name, a), b in zip(offloaded.named_parameters(), plain.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), name


def _fsdp_worker(rank: int, nf4: bool) -> None:
    from torch.distributed.tensor import DTensor

    gangs = setup_gangs(device="cpu")
    plain, offloaded = lora_llama(nf4=nf4, gangs=gangs), lora_llama(nf4=nf4, gangs=gangs)
    dropped = track_block_inputs(offloaded)
    loss_of(plain, seed=rank).backward()
    hooks = ActivationOffloading(min_bytes=BLOCK_INPUT_BYTES)
    with hooks:
        loss = loss_of(offloaded, seed=rank)
    assert len(dropped) == LLAMA.n_layers and all(ref() is None for ref in dropped)
    loss.backward()
    assert hooks.prefetched_bytes >= LLAMA.n_layers * BLOCK_INPUT_BYTES
    for (name, a), b in zip(offloaded.named_parameters(), plain.parameters(), strict=True):
        if a.requires_grad:
            assert isinstance(a.grad, DTensor) and torch.equal(a.grad.to_local(), b.grad.to_local()), name


@pytest.mark.parametrize("nf4", [False, True], ids=["lora", "qlora"])
def test_full_checkpointing_offloads_under_fsdp2(nf4):
    if nf4:
        pytest.importorskip("torchao")
    run_distributed(_fsdp_worker, 2, nf4)
