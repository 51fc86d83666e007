"""A second model family, defined here and registered with one call, runs through
`ft lm instruction_finetune`, `ft lm generate` and `ft <family> write_hf_config`:
a family is one folder (here: this file) plus one registration line."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ft.cli import main
from ft.cli.verbs import registered_commands
from ft.models import load_model
from ft.models.family import FAMILIES, ModelFamily, family_of, register_family
from ft.models.llama.checkpoint import config_from_hf_dict
from ft.models.llama.family import LLAMA_FAMILY
from ft.models.llama.hf import hf_config_dict
from ft.models.llama.model import Llama, LlamaConfig
from ft.registry import Registry

DEFAULT_ASSETS = Path(__file__).resolve().parents[2] / "src" / "ft" / "assets" / "default"


@dataclass(kw_only=True, frozen=True)
class TinyLmConfig(LlamaConfig):
    """A renamed Llama: its own config class, archs and HF model_type."""


class TinyLm(Llama):
    pass


def _tinylm_from_hf(d: dict, *, source: str = "config.json") -> TinyLmConfig:
    llama = config_from_hf_dict({**d, "model_type": "llama"}, source=source)
    return TinyLmConfig(**{f.name: getattr(llama, f.name) for f in dataclasses.fields(llama)})


def _tinylm_hf_config(config: TinyLmConfig, *, dtype: torch.dtype = torch.bfloat16) -> dict:
    return {**hf_config_dict(config, dtype=dtype), "model_type": "tinylm", "architectures": ["TinyLmForCausalLM"]}


def _tinylm_family() -> ModelFamily:
    archs: Registry[TinyLmConfig] = Registry("tinylm arch")
    archs.register("tinylm_small", TinyLmConfig(
        vocab_size=1024, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256, bos_id=1, eos_id=2,
    ))
    return dataclasses.replace(
        LLAMA_FAMILY, name="tinylm", config_class=TinyLmConfig, model_class=TinyLm, archs=archs,
        update_config=lambda config, overrides, source="": dataclasses.replace(config, **overrides),
        hf_model_types=("tinylm",), config_from_hf=_tinylm_from_hf, hf_config=_tinylm_hf_config,
        config_from_meta=None, iter_meta_state_dict=None,
    )


@pytest.fixture
def tinylm(tmp_path, monkeypatch):
    register_family(_tinylm_family())  # the one line a new family adds
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "tinylm.yaml").write_text(
        "name: tinylm_card\nmodel_family: tinylm\nmodel_arch: tinylm_small\n"
        f"tokenizer: {DEFAULT_ASSETS / 'tokenizer.model'}\ntokenizer_family: llama2\n"
    )
    monkeypatch.setenv("FT_USER_ASSET_DIR", str(cards))
    yield
    FAMILIES.unregister("tinylm")


def test_a_registered_family_trains_generates_and_exports(tmp_path, tinylm):
    assert registered_commands()["tinylm"] == ["write_hf_config"]
    out = tmp_path / "train"
    assert main([
        "lm", "instruction_finetune", str(out), "--no-sweep-dir", "--config", "model=tinylm_card",
        "max_num_steps=2", "max_seq_len=128", "max_num_tokens=256", "save_model_dtype=float32",
    ]) == 0
    step = out / "checkpoints" / "step_2"
    config_json = json.loads((step / "config.json").read_text())
    assert config_json["model_type"] == "tinylm"
    model = load_model(step)
    assert isinstance(model, TinyLm) and family_of(model).name == "tinylm"

    gen = tmp_path / "generate"
    assert main([
        "lm", "generate", str(gen), "--no-sweep-dir", "--config", f"checkpoint_dir={out / 'checkpoints'}",
        "model=last_checkpoint", "split=test", "generator_config.max_gen_len=4", "generator_config.batch_size=8",
    ]) == 0
    assert (gen / "output" / "rank_0.jsonl").read_text().strip()

    (step / "config.json").unlink()
    assert main(["tinylm", "write_hf_config", "--model", "tinylm_small", str(step)]) == 0
    assert json.loads((step / "config.json").read_text())["model_type"] == "tinylm"
    torch.testing.assert_close(load_model(step).state_dict(), model.state_dict())


def test_arch_names_are_unique_across_families(tinylm):
    clash = dataclasses.replace(_tinylm_family(), name="clash")
    with pytest.raises(ValueError, match="tinylm_small"):
        register_family(clash)
