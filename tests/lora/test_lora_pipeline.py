"""LoRA on pipeline stages (`ft.models.pipeline`): the frozen base stays bitwise what the
checkpoint holds through pipeline training steps on 2 gloo processes, each pipeline rank
loads (and checks) its own blocks' tensors of an adapter a run starts from, and QLoRA
with pipeline stages is refused before any work. The recipe on pp=2 against one process
is tests/distributed/test_recipe_pipeline.py."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from ft.errors import CheckpointError
from ft.lora import LoraConfig, apply_lora, init_lora_weights, lora_state_dict
from ft.lora.adapter_model import load_adapter_weights
from ft.models import build_model
from ft.models.pipeline import pipeline_stages
from tests.distributed.dist_launcher import run_distributed
from tests.recipes.conftest import run_finetune, user_assets  # noqa: F401  (a fixture)

LORA = LoraConfig(enabled=True, rank=4, alpha=8)


def _batches(n: int, seed: int, B: int = 2, T: int = 32) -> list:
    from ft.data.packing import Batch

    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens_BT = torch.randint(3, 1000, (B, T), generator=generator)
        labels_BT = torch.roll(tokens_BT, -1, dims=1)
        labels_BT[:, -1] = -100
        out.append(Batch(tokens_BT=tokens_BT, labels_BT=labels_BT, positions_BT=torch.arange(T).expand(B, T).clone(),
                         document_ids_BT=torch.zeros(B, T, dtype=torch.int64),
                         num_target_tokens=int((labels_BT != -100).sum()), num_tokens=B * T, num_examples=B))
    return out


def _frozen_base_worker(rank: int, checkpoint: str) -> None:
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    from ft.gang import setup_gangs
    from ft.lora.training import start_lora, with_lora
    from ft.models.build import create_model
    from ft.models.checkpoint import read_checkpoint_config
    from ft.models.parallelize import parallelize_model
    from ft.models.pipeline import with_pipeline
    from ft.training.optim import build_optimizer, build_scheduler
    from ft.training.pipeline_step import PipelineRunner
    from ft.training.step import optimizer_step
    from ft.training.step_stats import StepStats

    with setup_gangs(device="cpu", pipeline_parallel_size=2) as gangs:
        parallelize = with_pipeline(lambda view: parallelize_model(view, gangs), pp_rank=gangs.pp.rank, pp_size=2,
                                    schedule="1f1b")
        model = create_model(read_checkpoint_config(Path(checkpoint)), device="cpu", checkpoint=Path(checkpoint),
                             parallelize=with_lora(parallelize, LORA, base_dtype=torch.float32))
        start_lora(model, LORA, seed=0, resuming=False, dtype=torch.float32)
        # Weight decay on: a frozen tensor the optimizer saw would move even without a gradient.
        optimizer = build_optimizer(model, learning_rate=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        scheduler = build_scheduler(optimizer, schedule="constant", warmup_steps=0, max_num_steps=10,
                                    final_lr_scale=1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        runner = PipelineRunner(model, gangs, schedule="1f1b", micro_batches=2, loss_chunk_size=16)
        for step in range(3):
            runner.step(_batches(2, seed=step), autocast=contextlib.nullcontext(), stats=StepStats.zero(gangs.device))
            optimizer_step(model, optimizer, scheduler, scaler, max_grad_norm=1.0, clip=runner.clip_grad_norm)

        def full(p: torch.Tensor) -> torch.Tensor:
            return (p.full_tensor() if isinstance(p, DTensor) else p).detach()

        on_disk = load_file(Path(checkpoint) / "model.safetensors")
        frozen = [(name, p) for name, p in model.named_parameters() if not p.requires_grad]
        assert frozen and all(p.grad is None for _, p in frozen)
        for name, p in frozen:
            assert torch.equal(full(p), on_disk[name].to(p.dtype)), name
        assert all(id(p) not in {id(q) for q in optimizer.state} for _, p in frozen)
        adapters_B = [full(p) for name, p in model.named_parameters() if ".lora_B." in name]
        assert adapters_B and all(b.abs().sum() > 0 for b in adapters_B)  # the adapters trained


def test_frozen_base_stays_bitwise_through_pipeline_steps(user_assets):
    from ft.assets import load_card

    run_distributed(_frozen_base_worker, 2, str(load_card("ft_tiny").path("checkpoint")))


def _lora_model(seed: int | None = None):
    model = apply_lora(build_model("llama_debug", device="cpu", seed=0), LORA, base_dtype=torch.float32)
    if seed is not None:
        init_lora_weights(model, seed)
    return model


def test_each_pipeline_rank_loads_its_blocks_of_an_adapter():
    state = lora_state_dict(_lora_model(seed=1))
    seen = set()
    for rank in range(2):
        part = pipeline_stages(_lora_model(), pp_rank=rank, pp_size=2, schedule="1f1b")
        load_adapter_weights(part, state, source=Path("adapter"))
        held = {name: p for name, p in part.named_parameters() if p.requires_grad}
        assert held and all(torch.equal(p, state[name]) for name, p in held.items())
        seen |= held.keys()
    assert seen == state.keys()  # between them the ranks loaded every tensor
    # A tensor of a layer the model does not have is still an error, on every rank.
    foreign = {**state, "model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)}
    for rank in range(2):
        part = pipeline_stages(_lora_model(), pp_rank=rank, pp_size=2, schedule="1f1b")
        with pytest.raises(CheckpointError, match="layers.9.*matches no adapted layer"):
            load_adapter_weights(part, foreign, source=Path("adapter"))


def test_qlora_with_pipeline_stages_fails_before_any_work(tmp_path, user_assets, capsys):
    out = tmp_path / "run"
    code = run_finetune(out, "lora.enabled=true", "lora.base_quantization=nf4", "pipeline_parallel_size=2",
                        "gradient_accumulation=2")
    assert code != 0
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert "'lora.base_quantization'" in line and "pipeline_parallel_size=2" in line
    assert "use lora.base_quantization=none" in line
    assert not (out / "checkpoints").exists()
