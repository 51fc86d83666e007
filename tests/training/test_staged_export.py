"""One process, background saves: the HF model written from the host copy of the
trainer state equals the export gathered from the live model, file for file; the
host buffers are allocated ahead of the first save and reused; a state too large
for host memory is saved from the device instead."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch
from safetensors.torch import load_file

from ft.gang import setup_gangs
from ft.models import find_arch
from ft.models.build import create_model
from ft.models.parallelize import parallelize_model
from ft.training import background_save
from ft.training.checkpoint import CheckpointManager
from ft.training.export import export_hf_model, write_hf_model_from_state


def _train_one_step(tied: bool):
    config = dataclasses.replace(find_arch("ft_tiny")[1], tie_embeddings=tied)
    with setup_gangs(device="cpu") as gangs:
        model = create_model(config, device="cpu", seed=0, parallelize=functools.partial(
            parallelize_model, gangs=gangs, activation_checkpointing="selective"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model(tokens).float().square().mean().backward()
    optimizer.step()
    return model, optimizer


def _manager(directory, **kwargs) -> CheckpointManager:
    return CheckpointManager(directory, is_main=True, barrier=lambda: None, keep_last_n_checkpoints=None,
                             keep_last_n_models=None, **kwargs)


@pytest.mark.parametrize("tied", [False, True])
def test_export_from_the_staged_state_equals_the_gathered_export(tmp_path, tied):
    model, optimizer = _train_one_step(tied)
    staged_calls = []

    def export_staged(directory, state):
        staged_calls.append(sorted(state))
        write_hf_model_from_state(directory, state, config=model.config, dtype=torch.bfloat16)

    background = _manager(tmp_path / "background", background=True)
    background.prepare(model, optimizer)
    background.wait()  # the buffers are allocated on the worker thread
    reserved = dict(background._stager._buffers)
    assert reserved  # allocated by prepare, before any save
    staged_step = background.save(1, model=model, optimizer=optimizer, extra={"step": 1}, model_config={},
                                  export_model=None, export_staged=export_staged)
    background.close()
    assert staged_calls, "the staged export was not used"
    assert all(background._stager._buffers[path] is buffer for path, buffer in reserved.items())

    plain = _manager(tmp_path / "plain")
    plain_step = plain.save(1, model=model, optimizer=optimizer, extra={"step": 1}, model_config={},
                            export_model=functools.partial(export_hf_model, model, is_main=True, dtype=torch.bfloat16))
    staged_files = sorted(p.name for p in staged_step.iterdir() if p.suffix in (".safetensors", ".json"))
    assert staged_files == sorted(p.name for p in plain_step.iterdir() if p.suffix in (".safetensors", ".json"))
    for name in staged_files:
        if name.endswith(".safetensors"):
            got, want = load_file(str(staged_step / name)), load_file(str(plain_step / name))
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
        elif name != "ft-manifest.json":
            assert json.loads((staged_step / name).read_text()) == json.loads((plain_step / name).read_text()), name


def test_a_state_too_large_for_host_memory_is_saved_from_the_device(tmp_path, monkeypatch, caplog):
    model, optimizer = _train_one_step(False)
    monkeypatch.setattr("ft.training.checkpoint.available_host_memory", lambda: 1024)
    mgr = _manager(tmp_path / "checkpoints", background=True)
    mgr.prepare(model, optimizer)
    assert "too large to copy to host memory" in caplog.text
    step = mgr.save(1, model=model, optimizer=optimizer, extra={"step": 1}, model_config={},
                    export_model=functools.partial(export_hf_model, model, is_main=True, dtype=torch.bfloat16,
                                                   defer=True),
                    export_staged=lambda directory, state: pytest.fail("no host copy was made"))
    mgr.close()
    assert (step / "model.safetensors").is_file() and mgr.latest_resumable_step() == 1


def test_layout_lists_every_tensor_of_a_nested_state():
    state = {"a": torch.zeros(2, 3), "b": [torch.zeros(1, dtype=torch.bfloat16), {"c": torch.zeros(4)}], "d": 1}
    layout = background_save.CpuStager.layout(state)
    assert set(layout) == {"/a", "/b/0", "/b/1/c"}
    assert background_save.layout_bytes(layout) == 6 * 4 + 2 + 4 * 4


def test_model_only_saves_stage_only_the_model(tmp_path, monkeypatch):
    model, optimizer = _train_one_step(False)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # room for the model's copy, not for the model and AdamW's two states
    monkeypatch.setattr("ft.training.checkpoint.available_host_memory", lambda: 3 * model_bytes)
    mgr = _manager(tmp_path / "checkpoints", background=True)
    mgr.prepare(model, optimizer, model_only=True)
    mgr.wait()
    assert mgr._stager is not None and all(path.startswith("/model/") for path in mgr._stager._buffers)
    written = []
    step = mgr.save(1, model=model, optimizer=optimizer, extra={"step": 1}, model_config={}, export_model=None,
                    model_only=True, export_staged=lambda directory, state: written.append(
                        write_hf_model_from_state(directory, state, config=model.config, dtype=torch.bfloat16)))
    mgr.close()
    assert written and (step / "model.safetensors").is_file() and not (step / "trainer").exists()
