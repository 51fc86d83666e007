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


def test_four_bit_adamw_counts_its_step_intermediates_for_the_largest_parameter(shapes):
    """torchao's 4-bit step materialises int64 codes and float32 values of both states for the
    parameter it steps (24 bytes per element); the 8-bit step fuses them."""
    plan = MemoryPlan(model_config=CONFIG, dtype="bfloat16", mixed_precision=False, optimizer="adamw4bit",
                      activation_checkpointing="selective", max_num_tokens=TOKENS)
    largest = max(math.prod(shape) for shape in shapes.values())
    assert predict_memory(plan, shapes).step_transient == 24 * largest
    assert predict_memory(dataclasses.replace(plan, optimizer="adamw8bit"), shapes).step_transient == 0
