"""Checkpoint loading: errors that name the tensor, one read per tensor straight
into the parameter, cards, Meta params.json, and `ft llama write_hf_config`."""

from __future__ import annotations

import dataclasses
import json
import weakref

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

import argparse

from ft.errors import AssetError, CheckpointError, ConfigError, FtError
from ft.models import build_model, load_model
from ft.models.checkpoint import load_checkpoint
from ft.models.cli import write_hf_config_command
from ft.models.hf_export import save_hf_model
from ft.models.llama.checkpoint import config_from_meta_params

WRITE_HF_CONFIG_COMMAND = write_hf_config_command("llama")
from ft.models.llama.model import LLAMA_ARCHS, Llama


@pytest.fixture
def hf_dir(tmp_path):
    model = build_model("llama_debug", device="cpu", seed=0)
    save_hf_model(model, tmp_path / "ckpt", dtype=torch.float32, max_shard_size_bytes=40_000)
    return tmp_path / "ckpt", model


def _meta_model(name="llama_debug", dtype=torch.float32, **changes):
    config = dataclasses.replace(LLAMA_ARCHS[name], **changes)
    with torch.device("meta"):
        model = Llama(config)
    model.to(dtype).to_empty(device="cpu")
    model.reset_buffers()
    return model


def test_sharded_load_reads_each_tensor_once_into_the_parameter(hf_dir, monkeypatch):
    directory, source = hf_dir
    assert len(list(directory.glob("*.safetensors"))) > 3
    model = _meta_model()
    storage = {name: p.data_ptr() for name, p in model.named_parameters()}
    reads: dict[str, int] = {}
    alive: list[tuple[str, weakref.ref]] = []
    real_safe_open = safetensors.safe_open

    class Spy:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, name):
            return self.inner.get_slice(name)  # metadata only, unless indexed

        def get_tensor(self, name):
            # Every tensor read before must already be freed: never two copies at once.
            still = [n for n, ref in alive if ref() is not None]
            assert not still, f"{still} still alive while reading {name}"
            reads[name] = reads.get(name, 0) + 1
            tensor = self.inner.get_tensor(name)
            alive.append((name, weakref.ref(tensor)))
            return tensor

    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: Spy(real_safe_open(*a, **k)))
    load_checkpoint(model, directory)
    assert reads == {name: 1 for name in storage}
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == storage
    for (name, p), q in zip(model.named_parameters(), source.parameters()):
        assert torch.equal(p, q), name


def test_load_casts_to_requested_dtype(hf_dir):
    directory, source = hf_dir
    model = load_model(directory, dtype=torch.bfloat16)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.lm_head.weight, source.lm_head.weight.to(torch.bfloat16))
    assert load_model(directory).lm_head.weight.dtype == torch.float32  # default: as stored


def test_missing_tensor_is_named(hf_dir):
    directory, _ = hf_dir
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    file = directory / index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        load_model(directory)


def test_shape_mismatch_names_tensor_and_file(hf_dir):
    directory, _ = hf_dir
    model = _meta_model(ffn_dim=128)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' in .*model-\d+-of-\d+\.safetensors has shape \[160, 64\], the model expects \[128, 64\]"):
        load_checkpoint(model, directory)


def test_unexpected_tensor_is_named(tmp_path):
    model = build_model("llama_debug_tied", device="cpu", seed=0)
    tensors = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tensors["model.layers.7.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.7\.mlp\.up_proj\.weight' in .*model\.safetensors"):
        load_checkpoint(_meta_model("llama_debug_tied"), tmp_path)


def test_tied_config_refuses_a_different_lm_head(hf_dir):
    directory, _ = hf_dir  # an untied checkpoint: lm_head.weight != embed_tokens.weight
    with pytest.raises(CheckpointError, match="lm_head.weight.*ties"):
        load_checkpoint(_meta_model("llama_debug", tie_embeddings=True), directory)


def test_missing_meta_tensor_is_named(tmp_path):
    torch.save({"tok_embeddings.weight": torch.zeros(256, 64), "norm.weight": torch.ones(64)}, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\..*' is missing from Meta checkpoint"):
        load_checkpoint(_meta_model("llama_debug_tied"), tmp_path)


def test_step_dir_without_config_and_missing_paths(tmp_path, hf_dir):
    directory, _ = hf_dir
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match="write_hf_config"):
        load_model(directory)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        load_model(tmp_path / "empty")


def test_meta_params_json_gives_the_published_configs():
    llama2_7b = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}
    llama3_1_8b = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                   "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-05, "rope_theta": 500000.0,
                   "use_scaled_rope": True}
    llama3_2_1b = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                   "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
                   "use_scaled_rope": True}
    llama3_1_70b = {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 128256,
                    "ffn_dim_multiplier": 1.3, "multiple_of": 4096, "norm_eps": 1e-05, "rope_theta": 500000.0,
                    "use_scaled_rope": True}
    for params, arch in [(llama2_7b, "llama2_7b"), (llama3_1_8b, "llama3_1_8b"), (llama3_2_1b, "llama3_2_1b"),
                         (llama3_1_70b, "llama3_1_70b")]:
        assert config_from_meta_params(params) == LLAMA_ARCHS[arch], arch


def _write_card(directory, text):
    directory.mkdir(exist_ok=True)
    (directory / "cards.yaml").write_text(text)


def test_load_model_from_card(tmp_path, monkeypatch, hf_dir):
    directory, source = hf_dir
    cards = tmp_path / "cards"
    monkeypatch.setenv("FT_USER_ASSET_DIR", str(cards))
    _write_card(cards, f"""
name: dbg
model_family: llama
model_arch: llama_debug
checkpoint: {directory}
---
name: dbg_wrong
base: dbg
model_config: {{ffn_dim: 128}}
---
name: dbg_typo
base: dbg
model_config: {{fn_dim: 128}}
---
name: dbg_family
base: dbg
model_family: mistral
""")
    model = load_model("dbg", dtype=torch.float32)
    tokens_BT = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens_BT), source(tokens_BT))
    with pytest.raises(CheckpointError, match="gate_proj"):
        load_model("dbg_wrong")
    with pytest.raises(ConfigError, match="did you mean 'ffn_dim'"):
        load_model("dbg_typo")
    with pytest.raises(AssetError, match="mistral"):
        load_model("dbg_family")
    with pytest.raises(AssetError):
        load_model("no_such_card")


def main(argv: list[str]) -> int:
    """`ft ARGV` for this one command, with ft.cli.main's error handling (the full
    CLI imports every recipe, which other tests cover)."""
    assert argv[:2] == ["llama", "write_hf_config"]
    parser = argparse.ArgumentParser()
    WRITE_HF_CONFIG_COMMAND.add_arguments(parser)
    try:
        return WRITE_HF_CONFIG_COMMAND.run(parser.parse_args(argv[2:])) or 0
    except FtError as error:
        print(f"error: {error}", file=__import__("sys").stderr)
        return error.exit_code


def test_write_hf_config_cli(tmp_path, hf_dir, capsys):
    directory, _ = hf_dir
    (directory / "config.json").unlink()
    (directory / "generation_config.json").unlink()
    assert main(["llama", "write_hf_config", "--model", "llama_debug", str(directory)]) == 0
    config = json.loads((directory / "config.json").read_text())
    assert config["hidden_size"] == 64 and config["torch_dtype"] == "float32"
    assert config["rope_scaling"]["rope_type"] == "llama3"
    assert (directory / "generation_config.json").is_file()
    assert load_model(directory).config == LLAMA_ARCHS["llama_debug"]

    assert main(["llama", "write_hf_config", "--model", "ft_tiny", str(directory)]) != 0
    assert "model.embed_tokens.weight" in capsys.readouterr().err  # the arch does not fit the weights
    assert main(["llama", "write_hf_config", "--model", "llama9_7b", str(directory)]) != 0
    err = capsys.readouterr().err
    assert "llama9_7b" in err and "llama3_2_1b" in err
    assert main(["llama", "write_hf_config", "--model", "llama_debug", str(tmp_path / "missing")]) != 0
    assert "not a directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["llama", "write_hf_config", "--model", "llama3_2_1b", str(empty)]) == 0
    assert json.loads((empty / "config.json").read_text())["torch_dtype"] == "bfloat16"
