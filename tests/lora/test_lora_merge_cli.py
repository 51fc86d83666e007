"""`ft lm merge_lora OUT --config lora_dir=STEP` on a tiny LoRA run (CPU): transformers loads
OUT as is with PEFT's base + adapter logits, the tensors equal the run's own
`lora.export_merged`, a merge ft wrote is replaced, and bad input is one message, a
non-zero exit and nothing written or changed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ft.cli import main
from tests.recipes.conftest import user_assets  # noqa: F401  (a fixture)

from tests.lora.lora_runs import lora_run  # noqa: F401  (a fixture)


def merge(out, *overrides) -> int:
    return main(["lm", "merge_lora", str(out), "--config", *overrides])


def test_transformers_loads_the_merge_with_the_adapters_logits(tmp_path, user_assets, lora_run):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from ft.assets import load_card
    from ft.tokenizers import load_tokenizer

    step = lora_run / "checkpoints" / "step_3"
    out = tmp_path / "merged"
    assert merge(out, f"lora_dir={step}", "dtype=float32") == 0  # the base: the ft_tiny card the adapter records
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists()  # transformers would take OUT for an adapter

    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    base = transformers.AutoModelForCausalLM.from_pretrained(load_card("ft_tiny").path("checkpoint"),
                                                             torch_dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(tokens).logits
        adapted = peft.PeftModel.from_pretrained(base, step).eval()(tokens).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
        merged_logits = merged(tokens).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-3)  # the adapters learned something
    torch.testing.assert_close(merged_logits, adapted, rtol=1e-4, atol=1e-4)

    ours, exported = load_file(out / "model.safetensors"), load_file(step / "merged" / "model.safetensors")
    assert ours.keys() == exported.keys() and all(torch.equal(ours[k], exported[k]) for k in ours)
    assert json.loads((out / "config.json").read_text()) == json.loads((step / "merged" / "config.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)  # the run's (ft_tiny's), saved beside the weights
    text = "Name three colours."
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == load_tokenizer("ft_tiny").encode(text)


def test_default_dtype_is_the_bases_and_a_merge_ft_wrote_is_replaced(tmp_path, user_assets, lora_run):
    step = lora_run / "checkpoints" / "step_3"
    out = tmp_path / "merged"
    assert merge(out, f"lora_dir={step}") == 0
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}  # as ft_tiny stores
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    record = json.loads((out / "ft-merge.json").read_text())
    assert record["base"] == "ft_tiny" and record["dtype"] == "bfloat16"

    assert merge(out, f"lora_dir={step}", "dtype=float32") == 0
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "user_assets"]  # no .tmp or .replaced left

    (tmp_path / "empty").mkdir()
    assert merge(tmp_path / "empty", f"lora_dir={step}") == 0
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_an_interrupted_merges_leftover_is_removed_and_a_foreign_one_kept(tmp_path, user_assets, lora_run, capsys):
    step = lora_run / "checkpoints" / "step_3"
    leftover = tmp_path / "merged.tmp"
    leftover.mkdir()
    (leftover / "ft-incomplete.json").write_text("{}")
    (leftover / "model-00001.safetensors.tmp").write_bytes(b"half")
    assert merge(tmp_path / "merged", f"lora_dir={step}") == 0
    assert not leftover.exists() and (tmp_path / "merged" / "model.safetensors").is_file()

    foreign = tmp_path / "other.tmp"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert merge(tmp_path / "other", f"lora_dir={step}") != 0
    assert "other.tmp exists and ft did not leave it there" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine" and not (tmp_path / "other").exists()


def _damaged_adapters(root, step):
    """Adapter directories that are wrong in one way each."""
    no_weights = root / "no_weights"
    no_weights.mkdir()
    shutil.copy(step / "adapter_config.json", no_weights)
    lost_base = root / "lost_base"
    shutil.copytree(step, lost_base, ignore=shutil.ignore_patterns("trainer"))
    config = json.loads((lost_base / "adapter_config.json").read_text())
    (lost_base / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(root / "gone")}))
    return no_weights, lost_base


@pytest.fixture
def other_bases(tmp_path):
    """HF directories of Llamas other than the ft_tiny the adapter was trained on: fewer
    layers, and the same layers narrower."""
    import dataclasses

    from ft.models import build_model
    from ft.models.family import find_arch
    from ft.models.hf_export import save_hf_model

    narrower = dataclasses.replace(find_arch("ft_tiny")[1], dim=64)
    for name, arch in (("fewer_layers", "llama_debug"), ("narrower", narrower)):
        save_hf_model(build_model(arch, device="cpu", seed=0), tmp_path / name, dtype=torch.float32)
    return tmp_path


@pytest.mark.parametrize("case, message, code", [
    ("no lora_dir", "config key 'lora_dir' is required", 2),
    ("lora_dir missing", "does not exist", 1),
    ("lora_dir is the run", "is not a LoRA adapter directory (adapter_config.json is missing); it holds a run's "
                            "checkpoints: pass one of their steps, e.g. lora_dir=", 1),
    ("no adapter weights", "adapter_model.safetensors is missing", 1),
    ("recorded base missing", "base model", 1),
    ("model missing", "does not exist", 1),
    ("model is the adapter", "config key 'model'", 2),
    ("base with fewer layers", "matches no adapted layer of the model: the adapter was trained on a different", 1),
    ("narrower base", "has shape [", 1),
    ("bad dtype", "config key 'dtype': unknown dtype 'int8'", 2),
    ("out is a file", "exists and is not a directory", 1),
    ("out holds other files", "is not empty and ft did not write a merge there (it holds no ft-merge.json)", 1),
    ("out is an adapter", "is not empty and ft did not write a merge there", 1),
    ("out is the adapter", "is the LoRA adapter", 2),
    ("out holds the adapter", "holds the LoRA adapter", 2),
])
def test_bad_input_is_one_message_and_writes_nothing(tmp_path, user_assets, lora_run, other_bases, capsys,
                                                     case, message, code):
    step = lora_run / "checkpoints" / "step_3"
    no_weights, lost_base = _damaged_adapters(tmp_path, step)
    out = tmp_path / "merged"
    settings = [f"lora_dir={step}"]
    if case == "no lora_dir":
        settings = ["dtype=float32"]
    elif case == "lora_dir missing":
        settings = [f"lora_dir={tmp_path / 'nothing'}"]
    elif case == "lora_dir is the run":
        settings = [f"lora_dir={lora_run}"]
    elif case == "no adapter weights":
        settings = [f"lora_dir={no_weights}"]
    elif case == "recorded base missing":
        settings = [f"lora_dir={lost_base}"]
    elif case == "model missing":
        settings.append(f"model={tmp_path / 'no_base'}")
    elif case == "model is the adapter":
        settings.append(f"model={step}")
    elif case == "base with fewer layers":
        settings.append(f"model={other_bases / 'fewer_layers'}")
    elif case == "narrower base":
        settings.append(f"model={other_bases / 'narrower'}")
    elif case == "bad dtype":
        settings.append("dtype=int8")
    elif case == "out is a file":
        out.write_text("mine")
    elif case == "out holds other files":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "out is an adapter":
        out = lost_base
    elif case in ("out is the adapter", "out holds the adapter"):
        settings = [f"lora_dir={lost_base}", "model=ft_tiny"]
        out = lost_base if case == "out is the adapter" else tmp_path
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    assert merge(out, *settings) == code
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error, error
    if case == "narrower base":
        assert "64" in error.split("the model expects")[1] and "the adapter was trained on a different model" in error
    if case == "recorded base missing":
        assert str(tmp_path / "gone") in error and "does not exist" in error
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written or changed
    assert not any(p.name.endswith((".tmp", ".replaced")) for p in tmp_path.rglob("*"))


def test_a_changed_merge_is_not_replaced(tmp_path, user_assets, lora_run, capsys):
    step = lora_run / "checkpoints" / "step_3"
    out = tmp_path / "merged"
    assert merge(out, f"lora_dir={step}") == 0
    with open(out / "config.json", "a") as file:
        file.write(" ")  # a user's edit
    edited = (out / "config.json").read_bytes()
    assert merge(out, f"lora_dir={step}") != 0
    error = capsys.readouterr().err
    assert "config.json has" in error and "ft wrote a merge there, but it has been changed" in error
    assert (out / "config.json").read_bytes() == edited

    (out / "config.json").write_bytes(edited[:-1])  # as ft wrote it again, plus a file of the user's
    (out / "README.md").write_text("mine")
    assert merge(out, f"lora_dir={step}") != 0
    assert "it holds README.md, which ft did not write" in capsys.readouterr().err
    assert (out / "README.md").read_text() == "mine"


def test_dump_config_shows_the_keys_and_writes_nothing(tmp_path, capsys):
    assert main(["lm", "merge_lora", str(tmp_path / "merged"), "--dump-config", "--config", "lora_dir=x"]) == 0
    dump = capsys.readouterr().out
    assert "lora_dir: x" in dump and "dtype: auto" in dump and "model: null" in dump
    assert not (tmp_path / "merged").exists()
