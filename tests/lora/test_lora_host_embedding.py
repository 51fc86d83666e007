"""`lora.embeddings_on_host`: the frozen input embedding table stays in host memory
(`ft.lora.host_embedding`). On CPU, with an untied tiny Llama: the module is replaced by
a frozen `HostEmbedding` holding the same table under the same name, a run trains bitwise
like one without the key (losses, adapters, merged export), resumes exactly, and each
combination that needs the table on the GPU is refused with a message; the memory model
drops the table's bytes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from ft.errors import ConfigError
from ft.lora import LoraConfig, apply_lora, init_lora_weights
from ft.lora.host_embedding import HostEmbedding, check_embeddings_on_host
from ft.lora.training import check_lora_run
from ft.models import build_model, create_model, find_arch
from ft.models.hf_export import save_hf_model
from ft.recipes.instruction_finetune_config import InstructionFinetuneConfig
from ft.training.memory_model import MemoryPlan, predict_memory
from ft.training.optim import build_optimizer
from tests.lora.lora_runs import LORA, assert_trainer_state_holds_only_adapters
from tests.recipes.test_instruction_finetune import stop_after
from tests.recipes.conftest import read_metrics, run_finetune, user_assets  # noqa: F401  (a fixture)

ON = "lora.embeddings_on_host=true"


def _lora_model(on_host: bool) -> torch.nn.Module:
    model = build_model("llama_debug", device="cpu", seed=0)
    apply_lora(model, LoraConfig(enabled=True, rank=4, alpha=8, embeddings_on_host=on_host), base_dtype=torch.float32)
    init_lora_weights(model, seed=0)
    return model


def test_the_embedding_is_a_frozen_host_module_with_the_same_table():
    plain, hosted = _lora_model(False), _lora_model(True)
    embedding = hosted.model.embed_tokens
    assert isinstance(embedding, HostEmbedding) and not isinstance(plain.model.embed_tokens, HostEmbedding)
    assert embedding.weight.device.type == "cpu" and not embedding.weight.requires_grad
    assert torch.equal(embedding.weight, plain.model.embed_tokens.weight)
    assert list(hosted.state_dict()) == list(plain.state_dict())  # checkpoint keys unchanged
    assert all(not p.requires_grad for n, p in hosted.named_parameters() if ".lora_" not in n)


def test_losses_and_adapter_gradients_are_bitwise_those_without_the_key():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 16), generator=generator) for _ in range(3)]
    runs = []
    for on_host in (False, True):
        model = _lora_model(on_host)
        optimizer = build_optimizer(model, learning_rate=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        losses, grads = [], []
        for tokens in batches:
            loss = model(tokens).float().logsumexp(-1).mean()
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
            optimizer.step()
            optimizer.zero_grad()
        runs.append((losses, grads))
    (plain_losses, plain_grads), (losses, grads) = runs
    assert all(torch.equal(a, b) for a, b in zip(losses, plain_losses))
    for ours, theirs in zip(grads, plain_grads):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(g.abs().sum() > 0 for n, g in grads[-1].items() if ".lora_A." in n)


def test_materializing_on_a_device_leaves_the_table_on_the_host():
    config = LoraConfig(enabled=True, rank=4, embeddings_on_host=True)
    model = build_model("llama_debug", device="meta")
    apply_lora(model, config, base_dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    model.to(torch.float32)  # a dtype change applies
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.is_pinned() == torch.cuda.is_available()
    if torch.cuda.is_available():
        model.to("cuda")
        assert model.model.embed_tokens.weight.device.type == "cpu"
        assert model.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
        tokens = torch.randint(0, 256, (2, 8), device="cuda")
        assert model.model.embed_tokens(tokens).device.type == "cuda"


@pytest.fixture
def untied_base(tmp_path):
    """The embedded default's shape untied (ft_tiny ties its embeddings), saved as an HF directory."""
    config = dataclasses.replace(find_arch("ft_tiny")[1], tie_embeddings=False)
    model = create_model(config, device="cpu", seed=0)
    save_hf_model(model, tmp_path / "base", dtype=torch.float32)
    return [f"model={tmp_path / 'base'}", "tokenizer=ft_tiny"]


def test_a_run_trains_like_without_the_key_and_resumes_exactly(tmp_path, user_assets, untied_base, monkeypatch):
    settings = [*LORA, *untied_base, "max_num_steps=4", "checkpoint_every_n_steps=100", "lora.export_merged=true"]
    plain, hosted, resumed = tmp_path / "plain", tmp_path / "hosted", tmp_path / "resumed"
    assert run_finetune(plain, *settings) == 0
    assert run_finetune(hosted, *settings, ON) == 0
    losses = [m["loss"] for m in read_metrics(plain)]
    assert [m["loss"] for m in read_metrics(hosted)] == losses and losses[-1] < losses[0]
    log = (hosted / "logs" / "rank_0.log").read_text()
    assert "input embedding table (0.00 GiB) in pageable host memory (HostEmbedding)" in log
    with monkeypatch.context() as patch:
        stop_after(patch, 2)
        run_finetune(resumed, *settings, ON)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_2"]
    assert run_finetune(resumed, *settings, ON) == 0
    assert [m["loss"] for m in read_metrics(resumed)] == losses

    step = plain / "checkpoints" / "step_4"
    for other in (hosted, resumed):
        other_step = other / "checkpoints" / "step_4"
        for file in ("adapter_model.safetensors", "merged/model.safetensors"):
            ours, theirs = load_file(other_step / file), load_file(step / file)
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), file
        assert (other_step / "adapter_config.json").read_text() == (step / "adapter_config.json").read_text()
    assert_trainer_state_holds_only_adapters(hosted / "checkpoints" / "step_4")


def test_qlora_with_the_key_trains_like_without(tmp_path, user_assets, untied_base):
    pytest.importorskip("torchao")
    settings = [*LORA, *untied_base, "lora.base_quantization=nf4", "max_num_steps=2", "activation_checkpointing=full"]
    assert run_finetune(tmp_path / "plain", *settings) == 0
    assert run_finetune(tmp_path / "hosted", *settings, ON) == 0
    losses = [m["loss"] for m in read_metrics(tmp_path / "plain")]
    assert [m["loss"] for m in read_metrics(tmp_path / "hosted")] == losses
    ours, theirs = (load_file(tmp_path / run / "checkpoints" / "step_2" / "adapter_model.safetensors")
                    for run in ("hosted", "plain"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("overrides, message", [
    (["lora.enabled=false"], r"'lora.embeddings_on_host' keeps LoRA's frozen input embedding on the host, but "
                             r"lora.enabled=false .* use lora.enabled=true or lora.embeddings_on_host=false"),
    (["lora.train_embeddings=true"], r"'lora.embeddings_on_host' and 'lora.train_embeddings' do not combine: .*"
                                     r"use lora.train_embeddings=false, or lora.embeddings_on_host=false"),
    (["tensor_parallel_size=2"], r"'lora.embeddings_on_host' runs on one process, but this run has "
                                 r"tensor_parallel_size=2 .* or use lora.embeddings_on_host=false"),
    (["pipeline_parallel_size=2"], r"this run has pipeline_parallel_size=2"),
    (["fsdp_replicas=2"], r"this run has fsdp_replicas=2"),
])
def test_combinations_that_need_the_table_on_the_gpu_are_refused_at_config_check(overrides, message):
    values = dict(item.split("=") for item in ["lora.enabled=true", ON, *overrides])
    lora = LoraConfig(**{k[5:]: v == "true" for k, v in values.items() if k.startswith("lora.")})
    sizes = {k: int(v) for k, v in values.items() if not k.startswith("lora.")}
    with pytest.raises(ConfigError, match=message):
        InstructionFinetuneConfig(lora=lora, **sizes).check()


def test_tied_embeddings_and_several_processes_are_refused_before_any_weights_load(tmp_path, user_assets, capsys):
    source = type("Source", (), {"checkpoint": tmp_path, "description": "base",
                                 "config": find_arch("llama_debug")[1]})()
    config = LoraConfig(enabled=True, embeddings_on_host=True)
    check_lora_run(config, source=source, dp_size=1, tp_size=1)
    for layout, named in (({"dp_size": 2, "tp_size": 1}, "data_parallel_size=2"),
                          ({"dp_size": 1, "tp_size": 1, "pp_size": 2}, "pipeline_parallel_size=2")):
        with pytest.raises(ConfigError, match=f"runs on one process, but this run has {named}"):
            check_lora_run(config, source=source, **layout)
    with pytest.raises(ConfigError, match="needs untied embeddings"):
        check_embeddings_on_host(config, model_config=find_arch("llama_debug_tied")[1], dp_size=1, tp_size=1, pp_size=1)
    # The embedded default (ft_tiny) ties its embeddings: one message, nothing written.
    assert run_finetune(tmp_path / "run", *LORA, ON, "max_num_steps=1") != 0
    err = capsys.readouterr().err
    assert "'lora.embeddings_on_host' needs untied embeddings" in err and "use lora.embeddings_on_host=false" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_memory_model_drops_the_tables_bytes():
    config = find_arch("llama3_1_8b")[1]
    plan = MemoryPlan(model_config=config, mixed_precision=False, activation_checkpointing="full",
                      activation_offloading=True, max_num_tokens=4096, loss_chunk_size=256, lora_rank=16)
    for nf4 in (False, True):
        on_gpu = predict_memory(dataclasses.replace(plan, lora_nf4=nf4))
        on_host = predict_memory(dataclasses.replace(plan, lora_nf4=nf4, lora_embeddings_on_host=True))
        table = config.vocab_size * config.dim * 2  # bf16
        assert on_gpu.weights - on_host.weights == table
        assert on_gpu.peak - on_host.peak == table
        assert on_host.params_total == on_gpu.params_total  # the model still has the table
