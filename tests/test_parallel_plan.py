"""`parallel_plan=auto` (`ft.parallel_plan.choose_plan`) on a table of (model, GPUs, memory) cases.

Expectations, by hand (full fine-tuning, AdamW, bfloat16 mixed precision: 4 bytes of
float32 weights + 8 of Adam states + 4 of gradients per parameter):
- 1B on one 141 GiB GPU: ~19 GiB of weights, states and gradients; activations of
  8192 tokens fit without checkpointing -> nothing to change.
- 8B on one 141 GiB GPU: 12 B/param of weights and states is ~90 GiB; the ~50 left
  do not hold 32 blocks of 8192 tokens' activations, selective checkpointing does.
- 8B on 8 x 80 GiB: FSDP shards the 16 B/param over 8 GPUs (~15 GiB) -> dp=8, no checkpointing.
- 8B on 16 GPUs (two nodes of 8): HSDP, one replica per node, beats FSDP over both nodes.
- 70B on 8 x 80 GiB: 70e9 x 16 B / 8 = 140 GB per GPU before activations: no layout fits.
- Settings chosen by hand are kept (pp=2 on 16 GPUs -> dp=8; tp=2 on 8 GPUs -> dp=4).
"""

from __future__ import annotations

import pytest

from ft.errors import ConfigError
from ft.models.llama.model import get_llama_arch
from ft.parallel_plan import choose_plan
from ft.training.memory_model import GIB, MemoryPlan


@pytest.mark.parametrize("arch, gpus, gib, micro, fixed, want", [
    ("llama3_2_1b", 1, 141, 1, {}, dict(dp=1, tp=1, pp=1, replicas=1, ac="none")),
    ("llama3_1_8b", 1, 141, 1, {}, dict(dp=1, tp=1, pp=1, replicas=1, ac="selective")),
    ("llama3_1_8b", 8, 80, 1, {}, dict(dp=8, tp=1, pp=1, replicas=1, ac="none")),
    ("llama3_1_8b", 16, 80, 1, {}, dict(dp=16, tp=1, pp=1, replicas=2, ac="none")),
    ("llama3_1_70b", 16, 80, 8, {"pipeline_parallel_size": 2}, dict(dp=8, tp=1, pp=2, replicas=1, ac="full")),
    ("llama3_1_8b", 8, 80, 1, {"tensor_parallel_size": 2}, dict(dp=4, tp=2, pp=1, replicas=1, ac="none")),
])
def test_planner_choices(arch, gpus, gib, micro, fixed, want):
    base = MemoryPlan(model_config=get_llama_arch(arch), max_num_tokens=8192)
    choice = choose_plan(base, world_size=gpus, gpu_memory_bytes=gib * GIB, micro_batches=micro, fixed=fixed)
    got = dict(dp=choice.dp, tp=choice.tp, pp=choice.pp, replicas=choice.replicas, ac=choice.activation_checkpointing)
    assert got == want, choice.describe()
    assert choice.estimate.peak_with_slack <= gib * GIB  # never a plan predicted to run out of memory
    assert choice.dp * choice.tp * choice.pp == gpus
    assert "parallel plan: dp=" in choice.describe()


def test_no_layout_fits_says_so():
    base = MemoryPlan(model_config=get_llama_arch("llama3_1_70b"), max_num_tokens=8192)
    with pytest.raises(ConfigError, match="none of the .* layouts of 8 GPU"):
        choose_plan(base, world_size=8, gpu_memory_bytes=80 * GIB, micro_batches=8)


def test_pipeline_stages_need_micro_batches():
    # One micro-batch per step: the planner never adds stages that would idle (or change the batch).
    base = MemoryPlan(model_config=get_llama_arch("llama3_1_70b"), max_num_tokens=8192)
    with pytest.raises(ConfigError):
        choose_plan(base, world_size=8, gpu_memory_bytes=80 * GIB, micro_batches=1)
