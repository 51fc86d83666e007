"""Hostile or broken config input (--config-file, --config): one line, a non-zero
exit, no traceback, bounded work and bounded echoes; hints name real keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from ft.cli import main

ANCHORS = ['&x0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'] + [
    f"&x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, 9)
]
# ~0.4 KB that expands to 9**9 strings; echoing it back never ended.
BOMB = "[" + ", ".join(ANCHORS) + "]"


def dump_config(capsys, *args: str) -> tuple[int, str]:
    code = main(["lm", "instruction_finetune", "OUT", *args, "--dump-config"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert len(lines[0]) < 400
    return code, lines[0]


def test_alias_bomb_in_a_config_file(tmp_path, capsys):
    file = tmp_path / "bomb.yaml"
    file.write_text(f"metric_recorders: {BOMB}\n")
    code, line = dump_config(capsys, "--config-file", str(file))
    assert code == 2 and f"{file}: the YAML expands to more than 10000 values" in line


def test_alias_bomb_in_an_override(capsys):
    code, line = dump_config(capsys, "--config", f"metric_recorders={BOMB}")
    assert code == 2 and "--config 'metric_recorders': the YAML expands to more than" in line


def test_a_long_wrong_value_is_echoed_short(capsys):
    code, line = dump_config(capsys, "--config", "max_seq_len=[" + ", ".join(["1234567890"] * 5000) + "]")
    assert code == 2 and "config key 'max_seq_len'" in line and "expected int" in line and "..." in line


def test_binary_config_file(tmp_path, capsys):
    file = tmp_path / "model.bin"
    file.write_bytes(bytes(range(256)) * 4)
    code, line = dump_config(capsys, "--config-file", str(file))
    assert code == 2 and f"config file {file} is not UTF-8 text" in line


def test_config_file_with_nul_bytes(tmp_path, capsys):
    file = tmp_path / "nul.yaml"
    file.write_bytes(b"seed: 1\n\x00\x00\n")
    code, line = dump_config(capsys, "--config-file", str(file))
    assert code == 2 and "holds NUL bytes" in line


def test_deeply_nested_config_file(tmp_path, capsys):
    file = tmp_path / "deep.yaml"
    file.write_text("seed: " + "[" * 5000 + "]" * 5000 + "\n")
    code, line = dump_config(capsys, "--config-file", str(file))
    assert code == 2 and str(file) in line and ("nested too deeply" in line or "100 levels" in line)


def test_huge_config_file(tmp_path, capsys):
    file = tmp_path / "huge.yaml"
    file.write_text("# padding\n" * 200_000)
    code, line = dump_config(capsys, "--config-file", str(file))
    assert code == 2 and "larger than 1 MiB" in line


@pytest.mark.parametrize("path_kind", ["missing", "directory"])
def test_config_file_that_is_not_a_file(tmp_path, capsys, path_kind):
    path = tmp_path / "conf"
    if path_kind == "directory":
        path.mkdir()
    code, line = dump_config(capsys, "--config-file", str(path))
    assert code == 2 and line.endswith("does not exist" if path_kind == "missing" else "is not a file")


def test_bom_in_a_config_file_is_accepted(tmp_path, capsys):
    file = tmp_path / "bom.yaml"
    file.write_bytes(b"\xef\xbb\xbfseed: 7\n")
    assert main(["lm", "instruction_finetune", "OUT", "--config-file", str(file), "--dump-config"]) == 0
    assert "seed: 7" in capsys.readouterr().out


@pytest.mark.parametrize("key, hint", [("lr", "learning_rate"), ("skip_malformed", "skip_malformed_lines"),
                                       ("max_steps", "max_num_steps")])
def test_hints_name_real_keys(capsys, key, hint):
    code, line = dump_config(capsys, "--config", f"{key}=1")
    assert code == 2 and f"unknown config key '{key}' (in --config); did you mean '{hint}'?" in line


def test_hint_never_names_a_key_the_command_lacks(capsys):
    code = main(["lm", "generate", "OUT", "--config", "lr=1", "--dump-config"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown config key 'lr'" in err and "learning_rate" not in err


@pytest.mark.parametrize("verb, key", [("generate", "checkpoint_dir"), ("instruction_finetune", "resume_checkpoint_dir")])
def test_missing_checkpoint_dir_says_it_does_not_exist(tmp_path, capsys, verb, key):
    missing = tmp_path / "nowhere" / "checkpoints"
    code = main(["lm", verb, str(tmp_path / "out"), "--no-sweep-dir", "--config", f"{key}={missing}",
                 "model=last_checkpoint"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"error: checkpoint directory {missing} does not exist" in err


def test_exit_codes_are_distinct():
    from ft.errors import EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_OK, EXIT_STOPPED, ConfigError, FtError

    codes = [EXIT_OK, FtError.exit_code, ConfigError.exit_code, EXIT_NONFINITE, EXIT_STOPPED, EXIT_INTERRUPTED]
    assert len(set(codes)) == len(codes)
