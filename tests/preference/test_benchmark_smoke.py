"""benchmarks/preference_throughput.py --tiny runs on CPU and its two loss paths agree."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "preference_throughput.py"


def test_tiny_run_prints_both_recipes_and_equal_losses(tmp_path, one_thread):
    spec = importlib.util.spec_from_file_location("preference_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--tiny", "--output", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["sft"]["tokens_per_s"] > 0 and result["dpo"]["tokens_per_s"] > 0
    memory = result["loss_memory"]
    assert abs(memory["chunked_loss"] - memory["full_logits_loss"]) <= 1e-4 * abs(memory["full_logits_loss"])
