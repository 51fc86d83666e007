"""Recipe config handling: merge order, YAML values, nested keys, errors, dump, hash."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from ft.config import build_config, config_hash, dump_config
from ft.errors import ConfigError
from ft.recipes.instruction_finetune_config import InstructionFinetuneConfig


@dataclass(kw_only=True)
class Sampling:
    temperature: float = 0.6
    top_k: int = 0


@dataclass(kw_only=True)
class Toy:
    name: str = "a"
    steps: int = 10
    lr: float = 1e-3
    dtype: Literal["float32", "bfloat16"] = "float32"
    betas: tuple[float, float] = (0.9, 0.95)
    recorders: list[str] = field(default_factory=lambda: ["jsonl"])
    limit: int | None = None
    flag: bool = False
    sampling: Sampling = field(default_factory=Sampling)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_then_files_left_to_right_then_overrides(tmp_path):
    first = write(tmp_path, "a.yaml", "steps: 20\nlr: 0.5\nname: first\n")
    second = write(tmp_path, "b.yaml", "steps: 30\n")
    config = build_config(Toy, config_files=[first, second], overrides=["name=cli"])
    assert (config.steps, config.lr, config.name, config.flag) == (30, 0.5, "cli", False)


def test_values_are_parsed_as_yaml():
    config = build_config(
        Toy, overrides=["steps=4096", "dtype=bfloat16", "betas=[0.9,0.99]", "recorders=[jsonl, wandb]", "limit=null", "flag=true", "lr=5e-6"]
    )
    assert config.steps == 4096 and config.dtype == "bfloat16"
    assert config.betas == (0.9, 0.99)
    assert config.recorders == ["jsonl", "wandb"]
    assert config.limit is None and config.flag is True and config.lr == 5e-6


def test_numbers_become_text_for_string_keys():
    assert build_config(Toy, overrides=["name=123"]).name == "123"


def test_dotted_keys_reach_nested_sections(tmp_path):
    file = write(tmp_path, "c.yaml", "sampling:\n  top_k: 5\n")
    config = build_config(Toy, config_files=[file], overrides=["sampling.temperature=0.1"])
    assert config.sampling == Sampling(temperature=0.1, top_k=5)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("no_such_key=1", "'no_such_key'"),
        ("stpes=3", "did you mean 'steps'"),
        ("sampling.temprature=0.1", "did you mean 'sampling.temperature'"),
        ("steps=abc", "config key 'steps'"),
        ("steps=1.5", "expected int"),
        ("dtype=bf16", "'float32' | 'bfloat16'"),
        ("betas=[1,2,3]", "config key 'betas'"),
        ("flag=maybe", "config key 'flag'"),
        ("noequals", "key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as error:
        build_config(Toy, overrides=[override])
    assert fragment in str(error.value)
    assert error.value.exit_code == 2


def test_bad_key_in_file_names_the_file(tmp_path):
    file = write(tmp_path, "bad.yaml", "stepz: 3\n")
    with pytest.raises(ConfigError, match=r"'stepz' \(in .*bad.yaml\).*'steps'"):
        build_config(Toy, config_files=[file])


def test_invalid_yaml_file_names_file_and_line(tmp_path):
    file = write(tmp_path, "broken.yaml", "steps: 3\nlr: [1,\n")
    with pytest.raises(ConfigError, match="broken.yaml:"):
        build_config(Toy, config_files=[file])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(Toy, config_files=["/no/such/file.yaml"])


def test_dump_config_round_trips(tmp_path):
    config = build_config(InstructionFinetuneConfig, overrides=["max_num_tokens=4096", "betas=[0.8,0.9]", "dtype=bfloat16"])
    dumped = write(tmp_path, "dump.yaml", dump_config(config))
    assert build_config(InstructionFinetuneConfig, config_files=[dumped]) == config


def test_hash_differs_when_any_key_differs():
    base = InstructionFinetuneConfig()
    seen = {config_hash(base)}
    for override in ["seed=3", "learning_rate=1e-4", "max_num_steps=151", "metric_recorders=[jsonl, tensorboard]"]:
        seen.add(config_hash(build_config(InstructionFinetuneConfig, overrides=[override])))
    assert len(seen) == 5
    assert config_hash(build_config(InstructionFinetuneConfig)) == config_hash(base)


def test_instruction_finetune_keeps_the_tutorial_keys():
    keys = set(InstructionFinetuneConfig.__dataclass_fields__)
    tutorial = {
        "dataset", "model", "max_seq_len", "max_num_tokens", "dtype", "max_num_steps", "max_num_data_epochs",
        "learning_rate", "checkpoint_every_n_steps", "keep_last_n_checkpoints", "keep_last_n_models",
        "publish_metrics_every_n_steps", "resume_checkpoint_dir", "seed", "gradient_accumulation",
        "max_grad_norm", "activation_checkpointing", "torch_compile", "validate_every_n_steps", "metric_recorders",
    }
    assert tutorial <= keys
