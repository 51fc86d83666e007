"""The memory model's LoRA and QLoRA terms on the Llama-3.1-8B shape (2 rows of 2048,
loss chunk 256, full activation checkpointing), against the arithmetic of that shape."""

import dataclasses
import math

import pytest

from ft.models.family import find_arch
from ft.training.memory_model import GIB, MemoryPlan, parameter_shapes, predict_memory

_, CONFIG = find_arch("llama3_1_8b")
TOKENS = 4096
BLOCK_INPUT_BYTES = TOKENS * CONFIG.dim * 2  # bf16: LoRA's frozen embedding sets the residual stream's dtype


@pytest.fixture(scope="module")
def shapes():
    return parameter_shapes(CONFIG)


def lora_plan(**changes) -> MemoryPlan:
    return dataclasses.replace(MemoryPlan(model_config=CONFIG, lora_rank=16, activation_checkpointing="full",
                                          max_num_tokens=TOKENS, loss_chunk_size=256), **changes)


@pytest.mark.parametrize("nf4", [False, True], ids=["lora", "qlora"])
def test_full_checkpointing_with_offloading_keeps_two_block_inputs_instead_of_all(shapes, nf4):
    kept = predict_memory(lora_plan(lora_nf4=nf4), shapes)
    offloaded = predict_memory(lora_plan(lora_nf4=nf4, activation_offloading=True), shapes)
    # Without offloading each block's input stays until its recompute; with it, backward holds
    # the block it recomputes and the next one's input, prefetched. The recompute itself stays.
    assert kept.activations - offloaded.activations == (CONFIG.n_layers - 2) * BLOCK_INPUT_BYTES
    assert offloaded.recompute == kept.recompute > 0
    assert offloaded.weights == kept.weights and offloaded.peak < kept.peak


def test_qlora_quantizes_only_the_block_linears(shapes):
    bf16 = predict_memory(lora_plan(), shapes)
    nf4 = predict_memory(lora_plan(lora_nf4=True), shapes)
    linears = sum(math.prod(shape) for name, shape in shapes.items() if ".layers." in f".{name}" and len(shape) == 2)
    # bf16 base 14.96 GiB; embeddings and output layer (2 x 128256 x 4096) stay bf16 under QLoRA.
    assert abs(bf16.weights - nf4.weights - linears * (2 - 0.5 - 4 / 64)) < 1
    assert 5.6 < nf4.weights / GIB < 5.9


def test_lora_without_checkpointing_casts_only_its_adapters(shapes):
    """Under autocast without checkpointing a full fine-tuning run keeps a bf16 cast of every
    float32 weight for backward; LoRA's frozen base is bf16 already, so only the adapters are cast."""
    plan = lora_plan(activation_checkpointing="none")
    lora = predict_memory(plan, shapes)
    stored = predict_memory(dataclasses.replace(plan, mixed_precision=False), shapes)  # bf16 adapters, no casts
    trainable = lora.params_trainable
    # float32 adapters and their bf16 casts, against bf16 adapters: 4 bytes more per adapter weight.
    assert lora.weights - stored.weights == trainable * 4
    assert lora.weights / GIB < 15.5  # the 14.96 GiB base once, not a second bf16 copy of it


def test_a_compiled_block_recomputes_the_swiglu_product(shapes):
    plan = lora_plan(activation_checkpointing="none")
    compiled = predict_memory(plan, shapes)
    eager = predict_memory(dataclasses.replace(plan, compiled=False), shapes)
    # bf16: 2 bytes of SwiGLU's product per token, FFN channel and block.
    assert eager.activations - compiled.activations == TOKENS * CONFIG.n_layers * CONFIG.ffn_dim * 2
    assert eager.weights == compiled.weights


def test_qlora_counts_the_dequantized_weight_inside_a_block(shapes):
    lora = predict_memory(lora_plan(), shapes)
    qlora = predict_memory(lora_plan(lora_nf4=True), shapes)
    assert lora.dequant_transient == 0
    assert qlora.dequant_transient == 12 * CONFIG.ffn_dim * CONFIG.dim  # the largest block linear
    # Full checkpointing: the peak is the first block's backward, recompute and dequantization together.
    assert qlora.peak == pytest.approx(qlora.weights + qlora.optimizer_states + qlora.activations
                                       + qlora.recompute + qlora.dequant_transient + qlora.output_gradient)


def test_four_bit_adamw_counts_its_step_intermediates_for_the_largest_parameter(shapes):
    """torchao's 4-bit step materialises int64 codes and float32 values of both states for the
    parameter it steps (24 bytes per element); the 8-bit step fuses them."""
    plan = MemoryPlan(model_config=CONFIG, dtype="bfloat16", mixed_precision=False, optimizer="adamw4bit",
                      activation_checkpointing="selective", max_num_tokens=TOKENS)
    largest = max(math.prod(shape) for shape in shapes.values())
    assert predict_memory(plan, shapes).step_transient == 24 * largest
    assert predict_memory(dataclasses.replace(plan, optimizer="adamw8bit"), shapes).step_transient == 0


@pytest.mark.parametrize("mode", ["elementwise", "selective", "full"])
def test_partial_checkpointing_spans_every_block_to_none(shapes, mode):
    """activation_checkpointing_blocks=N: N blocks at the checkpointed size, the rest at a whole
    block's; 32 blocks is the plain setting, 0 is no checkpointing; each block more saves memory."""
    plan = MemoryPlan(model_config=CONFIG, dtype="bfloat16", mixed_precision=False, activation_checkpointing=mode,
                      max_num_tokens=8192)
    every = predict_memory(plan, shapes)
    assert predict_memory(dataclasses.replace(plan, activation_checkpointing_blocks=CONFIG.n_layers), shapes) == every
    none = predict_memory(dataclasses.replace(plan, activation_checkpointing="none"), shapes)
    zero = predict_memory(dataclasses.replace(plan, activation_checkpointing_blocks=0), shapes)
    assert zero.activations == none.activations and zero.recompute == 0 and zero.peak == none.peak
    estimates = [predict_memory(dataclasses.replace(plan, activation_checkpointing_blocks=n), shapes)
                 for n in range(CONFIG.n_layers + 1)]
    steps = {round(b.activations - a.activations) for a, b in zip(estimates[1:], estimates)}
    assert len(steps) == 1 and steps.pop() > 0  # one block's saving, the same for each
    assert all(b.peak >= a.peak for a, b in zip(estimates[1:], estimates)) and estimates[0].peak > every.peak
    # Backward frees a block that is not checkpointed before it recomputes one that is.
    assert all(e.recompute == 0 for e in estimates[:-1]) and estimates[-1].recompute > 0


def test_each_mode_keeps_less_than_the_one_that_recomputes_less(shapes):
    """none > elementwise (every matmul output backward reads) > selective (every other one) > full."""
    plan = MemoryPlan(model_config=CONFIG, dtype="bfloat16", mixed_precision=False, max_num_tokens=8192)
    activations = [predict_memory(dataclasses.replace(plan, activation_checkpointing=mode), shapes).activations
                   for mode in ("none", "elementwise", "selective", "full")]
    assert activations == sorted(activations, reverse=True) and len(set(activations)) == 4


def test_partial_checkpointing_in_mixed_precision_keeps_autocast_casts_for_its_blocks(shapes):
    plan = MemoryPlan(model_config=CONFIG, activation_checkpointing="selective", max_num_tokens=TOKENS)
    weights = [predict_memory(dataclasses.replace(plan, activation_checkpointing_blocks=n), shapes).weights
               for n in (0, 16, 32)]
    none = predict_memory(dataclasses.replace(plan, activation_checkpointing="none"), shapes)
    assert weights[0] == none.weights and weights[0] > weights[1] > weights[2]
