"""`fp8=` in `ft lm instruction_finetune`: where it cannot run, one clear error line
before any training step (the conversion is measured on a GPU by benchmarks/train_throughput.py)."""

from tests.recipes.conftest import run_finetune


def test_fp8_on_a_cpu_is_one_error_line(tmp_path, user_assets, capsys):
    out = tmp_path / "run"
    assert run_finetune(out, "fp8=tensorwise", "device=cpu", "max_num_steps=1") != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [l for l in err.splitlines() if l.startswith("error: ")]
    assert "fp8=tensorwise needs a CUDA GPU" in line and "use fp8=none" in line
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_unknown_fp8_recipe_is_rejected(tmp_path, user_assets, capsys):
    assert run_finetune(tmp_path / "run", "fp8=mxfp8") != 0
    assert "fp8" in capsys.readouterr().err
