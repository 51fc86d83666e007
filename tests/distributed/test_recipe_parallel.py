"""`ft lm instruction_finetune` on 2 and 4 gloo processes, launched with torchrun.

Every parallel layout must train exactly like one process on the same global batch
(float32): FSDP and DDP with dp=2 like one process with gradient_accumulation=2, TP
like one process with the same settings, dp=2 x tp=2 like gradient_accumulation=2,
HSDP 2 x 2 like gradient_accumulation=4.
Compared: the loss curve and grad norms in OUT/metrics/train.jsonl, the global
example counts, the validation losses, and the exported HF weights of every
checkpoint. A run saved on dp=2 (or dp=2 x tp=2) resumes under tp=2, DDP and one
process and continues as the uninterrupted run did.
Impossible layouts fail on every rank before any work, naming the key; a SIGTERM
that reaches one rank stops all of them after the same step; tasks started as
`srun` starts them (faked SLURM_* variables) train like torchrun's.

The runs are shared through module-scoped fixtures (each costs 5-15 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ft.errors import EXIT_STOPPED

# The tiny default model on short rows, float32, 4 steps with a checkpoint at 2 and 4.
SETTINGS = [
    "max_seq_len=128", "max_num_tokens=256", "publish_metrics_every_n_steps=1", "warmup_steps=2",
    "dtype=float32", "max_num_steps=4", "checkpoint_every_n_steps=2", "keep_last_n_checkpoints=2",
    "save_model_dtype=float32", "validate_every_n_steps=2",
]
STEPS = [1, 2, 3, 4]

# float32 with a different reduction order (gloo all-reduce, sharded matmuls): losses
# agree to ~1e-7 relative, weights after 4 AdamW steps (lr 3e-3) to ~3e-5 under TP.
# A wrong global batch moves them by ~1e-2 (checked in test_tolerances_can_fail).
LOSS_RTOL = 1e-6
GRAD_NORM_RTOL = 1e-5
WEIGHT_ATOL = {"dp": 1e-5, "tp": 1e-4}

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK")


def clean_env(asset_dir: Path, **extra: str) -> dict[str, str]:
    """This environment without any launcher's variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("SLURM_")}
    # 2-4 processes share 2 cores: one thread each avoids oversubscription stalls.
    env.update(FT_USER_ASSET_DIR=str(asset_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def launch(out: Path, nproc: int, *overrides: str, asset_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m ft.cli lm instruction_finetune OUT ...`
    (plain `python -m ft.cli` for one process)."""
    command = ["-m", "ft.cli", "lm", "instruction_finetune", str(out), "--no-sweep-dir", "--config", *SETTINGS,
               *overrides]
    if nproc > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *command]
    return subprocess.run([sys.executable, *command], env=clean_env(asset_dir), capture_output=True, text=True,
                          timeout=timeout)


def metrics(out: Path, split: str = "train") -> list[dict]:
    return [json.loads(line) for line in (out / "metrics" / f"{split}.jsonl").read_text().splitlines()]


def weights(step_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(step_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    assert tensors, f"no safetensors in {step_dir}"
    return tensors


def assert_same_curve(run: Path, reference: Path, steps: list[int] = STEPS) -> None:
    got = {m["step"]: m for m in metrics(run)}
    want = {m["step"]: m for m in metrics(reference)}
    assert [m["step"] for m in metrics(run)] == STEPS  # each step once, in order
    for step in steps:
        g, w = got[step], want[step]
        assert g["loss"] == pytest.approx(w["loss"], rel=LOSS_RTOL, abs=0), f"step {step}"
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=GRAD_NORM_RTOL), f"step {step}"
        assert g["lr"] == pytest.approx(w["lr"], rel=1e-12), f"step {step}"
        # examples are summed over dp ranks: the global count, as one process counts it.
        assert g["examples"] == w["examples"], f"step {step}"
    # Validation: every rank a share of the split, losses and token counts summed.
    valid, valid_reference = metrics(run, "valid"), metrics(reference, "valid")
    assert [m["step"] for m in valid] == [2, 4]
    for g, w in zip(valid, valid_reference):
        assert g["target_tokens"] == w["target_tokens"]
        assert g["loss"] == pytest.approx(w["loss"], rel=LOSS_RTOL, abs=0), f"valid step {g['step']}"


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[name] - wb[name]).abs().max().item() for name in wa)


def assert_same_weights(run: Path, reference: Path, *, atol: float, steps=(2, 4)) -> None:
    for step in steps:
        a, b = run / "checkpoints" / f"step_{step}", reference / "checkpoints" / f"step_{step}"
        diff = max_weight_diff(a, b)
        assert diff <= atol, f"step_{step}: weights differ by up to {diff:.3g} (tolerance {atol})"


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


class Runs:
    """Runs of this module by name, each started once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.asset_dir = root / "user_assets"
        self.asset_dir.mkdir()
        self.results: dict[str, subprocess.CompletedProcess] = {}

    def get(self, name: str, nproc: int, *overrides: str) -> Path:
        out = self.root / name
        if name not in self.results:
            self.results[name] = launch(out, nproc, *overrides, asset_dir=self.asset_dir)
            assert_ok(self.results[name])
        return out

    def one_process_accumulating_2(self) -> Path:
        return self.get("one_ga2", 1, "gradient_accumulation=2")

    def one_process(self) -> Path:
        return self.get("one_ga1", 1)

    def fsdp(self) -> Path:
        return self.get("fsdp_dp2", 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("recipe_parallel"))


def test_fsdp_dp2_matches_one_process_with_accumulation(runs):
    out = runs.fsdp()
    reference = runs.one_process_accumulating_2()
    assert_same_curve(out, reference)
    assert_same_weights(out, reference, atol=WEIGHT_ATOL["dp"])
    # Both ranks wrote their DCP shard of the trainer state.
    trainer = out / "checkpoints" / "step_4" / "trainer"
    assert (trainer / ".metadata").is_file() and len(list(trainer.glob("*.distcp"))) == 2


def test_only_rank_0_publishes_and_every_rank_logs(runs):
    out = runs.fsdp()
    result = runs.results["fsdp_dp2"]
    console = result.stdout + result.stderr
    lines = console.splitlines()
    for step in STEPS:  # one console line per step, not one per rank
        assert sum(line.startswith(f"step {step} loss=") for line in lines) == 1, console[-3000:]
    assert sum(line.startswith("valid step 4 loss=") for line in lines) == 1
    assert console.count("train data (") == 1  # rank 1's log lines stay off the console
    for rank in (0, 1):
        log = (out / "logs" / f"rank_{rank}.log").read_text()
        assert "train data (" in log and "saved checkpoint" in log, f"rank_{rank}.log: {log[-500:]}"
    assert (out / "config.yaml").is_file()
    assert not list(out.glob(".config.yaml.*"))  # no leftover of the atomic write
    assert [m["step"] for m in metrics(out)] == STEPS  # metrics written once, not per rank


def test_ddp_dp2_matches_one_process_with_accumulation(runs):
    out = runs.get("ddp_dp2", 2, "data_parallelism=ddp")
    reference = runs.one_process_accumulating_2()
    assert_same_curve(out, reference)
    assert_same_weights(out, reference, atol=WEIGHT_ATOL["dp"])


def test_tp2_matches_one_process(runs):
    out = runs.get("tp2", 2, "tensor_parallel_size=2")
    reference = runs.one_process()
    assert_same_curve(out, reference)
    assert_same_weights(out, reference, atol=WEIGHT_ATOL["tp"])


def test_dp2_x_tp2_matches_one_process_with_accumulation(runs):
    out = runs.get("dp2_tp2", 4, "tensor_parallel_size=2")
    reference = runs.one_process_accumulating_2()
    assert_same_curve(out, reference)
    assert_same_weights(out, reference, atol=WEIGHT_ATOL["tp"])
    assert all((out / "logs" / f"rank_{rank}.log").is_file() for rank in range(4))


def test_hsdp_2x2_matches_one_process_with_accumulation_4(runs):
    """fsdp_replicas=2 on 4 processes: 2 replicas x 2 shards, dp=4."""
    out = runs.get("hsdp_2x2", 4, "fsdp_replicas=2")
    reference = runs.get("one_ga4", 1, "gradient_accumulation=4")
    assert_same_curve(out, reference)
    assert_same_weights(out, reference, atol=WEIGHT_ATOL["dp"])


def test_tolerances_can_fail(runs):
    """A different global batch (no accumulation) is far outside every tolerance above."""
    a, b = runs.one_process(), runs.one_process_accumulating_2()
    diff = max_weight_diff(a / "checkpoints" / "step_4", b / "checkpoints" / "step_4")
    assert diff > 100 * max(WEIGHT_ATOL.values())
    loss_a, loss_b = metrics(a)[-1]["loss"], metrics(b)[-1]["loss"]
    assert abs(loss_a - loss_b) > 1000 * LOSS_RTOL * loss_b


@pytest.mark.parametrize(
    "source, name, nproc, overrides",
    [
        ("fsdp_dp2", "tp2", 2, ["tensor_parallel_size=2", "gradient_accumulation=2"]),
        ("fsdp_dp2", "one_process", 1, ["gradient_accumulation=2"]),
        ("dp2_tp2", "ddp_dp2", 2, ["data_parallelism=ddp"]),
    ],
)
def test_resume_checkpoint_under_another_layout(runs, source, name, nproc, overrides):
    """Saved at step 2 with FSDP dp=2 (or dp=2 x tp=2) and resumed under another layout
    (DCP reshards model and optimizer state), the run matches the uninterrupted one:
    losses of steps 3-4 and the final weights."""
    saved = runs.fsdp() if source == "fsdp_dp2" else runs.get("dp2_tp2", 4, "tensor_parallel_size=2")
    reference = runs.one_process_accumulating_2()
    out = runs.root / f"resume_{source}_as_{name}"
    shutil.copytree(saved, out)
    shutil.rmtree(out / "checkpoints" / "step_4")  # as if stopped right after step 2's checkpoint
    result = launch(out, nproc, *overrides, asset_dir=runs.asset_dir)
    assert_ok(result)
    assert "resuming from" in (out / "logs" / "rank_0.log").read_text()
    # The resumed run replaced the old run's lines for steps 3-4 (each step once).
    assert_same_curve(out, reference)
    assert_same_weights(out, reference, atol=WEIGHT_ATOL["tp"], steps=(4,))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["tensor_parallel_size=4"], "tensor_parallel_size=4 does not divide the 2 processes"),
        (["tensor_parallel_size=3"], "tensor_parallel_size=3 does not divide the 2 processes"),
        (["tensor_parallel_size=2", "model=odd_kv_heads"], "tensor_parallel_size=2 does not divide the model's n_kv_heads=1"),
        (["data_parallelism=ddp", "fsdp_replicas=2"], "config key 'fsdp_replicas' (2) needs data_parallelism=fsdp"),
    ],
)
def test_impossible_layout_fails_on_every_rank_before_work(runs, overrides, message):
    (runs.asset_dir / "odd.yaml").write_text(
        "name: odd_kv_heads\nbase: ft_tiny\nmodel_config:\n  n_kv_heads: 1\n"
    )
    out = runs.root / f"bad_{overrides[0].replace('=', '_')}_{len(overrides)}"
    result = launch(out, 2, *overrides, asset_dir=runs.asset_dir, timeout=60)
    assert result.returncode != 0
    # Each rank refuses on its own, before any collective; torchrun stops the other worker as soon
    # as one exits, so under load the second message may never be written: one or two, all the same
    # (counted, not split into lines: two ranks' writes may interleave).
    errors = result.stderr.count("error: ")
    assert 1 <= errors <= 2 and result.stderr.count(f"error: {message}") == errors, result.stderr[-3000:]
    assert "ConfigError" not in result.stderr  # one clear line per rank, no Python traceback
    assert not (out / "checkpoints").exists() and not (out / "metrics").exists()


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(runs):
    """The stop flag is reduced over all ranks: a signal that reaches one worker only
    (as Ctrl-C or a scheduler may) still ends every rank after the same step, with a
    checkpoint of that step, and every worker exits EXIT_STOPPED (torchrun reports
    that as a failed worker with its exit code, and exits 1 itself)."""
    out = runs.root / "signal"
    env = clean_env(runs.asset_dir)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "ft.cli",
               "lm", "instruction_finetune", str(out), "--no-sweep-dir", "--config", *SETTINGS,
               "max_num_steps=1000", "checkpoint_every_n_steps=1000"]
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "metrics" / "train.jsonl").is_file():  # training has begun: handlers are installed
            assert launcher.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        workers = [int(pid) for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGTERM)
        output, _ = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0 and f"exitcode: {EXIT_STOPPED}" in output, output[-3000:]
    logs = [(out / "logs" / f"rank_{rank}.log").read_text() for rank in (0, 1)]
    assert sum("received signal" in log for log in logs) == 1
    stopped = [re.search(r"stopped by signal at step (\d+)", log) for log in logs]
    assert all(stopped), logs
    step = int(stopped[0].group(1))
    assert int(stopped[1].group(1)) == step < 1000
    step_dir = out / "checkpoints" / f"step_{step}"
    assert (step_dir / "trainer" / ".metadata").is_file() and (step_dir / "model.safetensors").is_file()
    assert metrics(out)[-1]["step"] == step


def test_srun_launch_trains_like_torchrun(runs):
    """Two tasks started as `srun` would (faked SLURM_* variables, no torchrun):
    launch detection builds the same dp=2 gang and the run matches the torchrun one."""
    reference = runs.fsdp()
    out = runs.root / "srun"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # MASTER_PORT overrides the port derived from the job id (test_gang checks that
    # derivation), so parallel test sessions cannot collide.
    base = clean_env(runs.asset_dir, SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_NTASKS="2",
                     SLURM_STEP_NUM_TASKS="2", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port))
    command = [sys.executable, "-m", "ft.cli", "lm", "instruction_finetune", str(out), "--no-sweep-dir", "--config",
               *SETTINGS]
    tasks = [
        subprocess.Popen(command, env={**base, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    try:
        outputs = [task.communicate(timeout=90)[0] for task in tasks]
    finally:
        for task in tasks:
            if task.poll() is None:
                task.kill()
    assert [task.returncode for task in tasks] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "step 1 loss=" in outputs[0] and "step 1 loss=" not in outputs[1]
    assert_same_curve(out, reference)
    assert_same_weights(out, reference, atol=WEIGHT_ATOL["dp"])
