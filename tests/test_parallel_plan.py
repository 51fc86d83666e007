"""`parallel_plan=auto` (`ft.parallel_plan.choose_plan`) on a table of (model, GPUs, memory) cases.

Expectations, by hand (full fine-tuning, AdamW, bfloat16 mixed precision: 4 bytes of
float32 weights + 8 of Adam states + 4 of gradients per parameter):
- 1B on one 141 GiB GPU: ~19 GiB of weights, states and gradients; activations of
  8192 tokens fit without checkpointing -> nothing to change.
- 8B on one 141 GiB GPU: 12 B/param of weights and states is ~90 GiB; the ~50 left
  do not hold 32 blocks of 8192 tokens' activations, elementwise checkpointing (every
  matmul output kept, ~23 GiB) does.
- 8B on 8 x 80 GiB: FSDP shards the 16 B/param over 8 GPUs (~15 GiB) -> dp=8, no checkpointing.
- 8B on 16 GPUs (two nodes of 8): HSDP, one replica per node, beats FSDP over both nodes.
- 70B on 8 x 80 GiB: 70e9 x 16 B / 8 = 140 GB per GPU before activations: no layout fits.
- Settings chosen by hand are kept (pp=2 on 16 GPUs -> dp=8; tp=2 on 8 GPUs -> dp=4).

Pipeline stages win where a GPU holds what FSDP does not shard: DDP's whole model, or
every block's gathered weights with fsdp_reshard_after_forward=false. There the planner
still proposes only layouts the recipe accepts with the run's other settings.
"""

from __future__ import annotations

import dataclasses

import pytest

from ft.errors import ConfigError
from ft.lora.config import LoraConfig
from ft.models.llama.model import get_llama_arch
from ft.models.parallelize import check_parallel_layout
from ft.models.pipeline import check_pipeline_layout
from ft.parallel_plan import apply_parallel_plan, choose_plan, fixed_settings
from ft.recipes.instruction_finetune_config import InstructionFinetuneConfig, check_pipeline_settings
from ft.recipes.memory_plan import memory_plan, planning_model_source
from ft.training.memory_model import GIB, MemoryPlan


@pytest.mark.parametrize("arch, gpus, gib, micro, fixed, want", [
    ("llama3_2_1b", 1, 141, 1, {}, dict(dp=1, tp=1, pp=1, replicas=1, ac="none")),
    ("llama3_1_8b", 1, 141, 1, {}, dict(dp=1, tp=1, pp=1, replicas=1, ac="elementwise")),
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


def _auto_config(**settings) -> InstructionFinetuneConfig:
    config = InstructionFinetuneConfig(parallel_plan="auto", dtype="bfloat16", gradient_accumulation=16,
                                       max_seq_len=2048, **settings)
    config.check()  # what the recipe checks before planning
    return config


def _unchecked_plan(config: InstructionFinetuneConfig, *, gpus: int, gib: float):
    """The layout the memory and speed model alone would take, without the recipe's checks."""
    model_config = planning_model_source(config).config
    return choose_plan(memory_plan(config, model_config, dp_size=1, tp_size=1), world_size=gpus,
                       gpu_memory_bytes=gib * GIB, micro_batches=config.gradient_accumulation,
                       fixed=fixed_settings(config))


def _stages_refused(config: InstructionFinetuneConfig) -> bool:
    try:
        check_pipeline_settings(dataclasses.replace(config, pipeline_parallel_size=2))
    except ConfigError:
        return True
    return False


# Runs where a layout with pipeline stages is the fastest that fits by memory and speed alone,
# with a setting the recipe refuses beside pipeline stages (DDP: also beside TP and HSDP);
# LoRA's row follows whichever rule the recipe has for LoRA with stages.
@pytest.mark.parametrize("model, gpus, gib, settings", [
    ("llama3_1_8b", 16, 26, dict(fsdp_reshard_after_forward=False, max_num_tokens=8192, sequence_parallel=True)),
    ("llama3_1_70b", 16, 141, dict(fsdp_reshard_after_forward=False, max_num_tokens=2048, sequence_parallel=True)),
    ("llama3_1_70b", 16, 141, dict(fsdp_reshard_after_forward=False, max_num_tokens=8192, activation_offloading=True)),
    ("llama3_2_3b", 8, 56, dict(data_parallelism="ddp", max_num_tokens=8192)),
    ("llama3_2_3b", 8, 56, dict(data_parallelism="ddp", max_num_tokens=24576)),
    ("llama3_1_8b", 8, 24, dict(fsdp_reshard_after_forward=False, max_num_tokens=2048,
                                lora=LoraConfig(enabled=True, rank=16))),
], ids=["sequence_parallel_8b", "sequence_parallel_70b", "activation_offloading", "ddp_8k", "ddp_24k", "lora"])
def test_auto_plans_only_layouts_the_recipe_accepts(model, gpus, gib, settings):
    config = _auto_config(model=model, **settings)
    assert _unchecked_plan(config, gpus=gpus, gib=gib).pp > 1  # the case is one where stages would win

    planned, choice = apply_parallel_plan(config, world_size=gpus, gpu_memory_bytes=gib * GIB, log=lambda line: None)
    if "lora" not in settings:
        assert _stages_refused(config)
    if _stages_refused(config):
        assert choice.pp == 1, choice.describe()
    assert choice.estimate.peak_with_slack <= gib * GIB
    # The user's settings are kept (sequence parallelism wherever there is TP to shard),
    # and the planned config passes the recipe's checks.
    assert {key: getattr(planned, key) for key in settings if key != "sequence_parallel"} == \
        {key: value for key, value in settings.items() if key != "sequence_parallel"}
    assert planned.sequence_parallel == (config.sequence_parallel and choice.tp > 1)
    planned.check()
    model_config = planning_model_source(planned).config
    check_parallel_layout(model_config, tensor_parallel_size=planned.tensor_parallel_size,
                          data_parallelism=planned.data_parallelism,
                          activation_checkpointing=planned.activation_checkpointing)
    check_pipeline_layout(model_config, pipeline_parallel_size=planned.pipeline_parallel_size,
                          schedule=planned.pipeline_schedule, micro_batches=planned.gradient_accumulation)


def test_no_accepted_layout_fits_says_what_refused_the_others():
    # 8B under DDP on 8 x 80 GiB fits only with stages, which DDP does not run with.
    config = _auto_config(model="llama3_1_8b", data_parallelism="ddp", max_num_tokens=2048)
    assert _unchecked_plan(config, gpus=8, gib=80).pp > 1
    with pytest.raises(ConfigError, match="refused with this run's other settings, e.g. config key 'data_parallelism'"):
        apply_parallel_plan(config, world_size=8, gpu_memory_bytes=80 * GIB, log=lambda line: None)
