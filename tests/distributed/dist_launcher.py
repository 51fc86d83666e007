"""Runs a test function on N gloo processes, launched the way torchrun would.

Each process gets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT, TORCHELASTIC_RUN_ID) on a free port, so `setup_gangs()` goes through
its real launch detection. An exception in any process fails the test with that
process's traceback; a hang fails it after `timeout` seconds.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import socket
import time
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="ft-test",
    )
    # 2-4 processes share 2 cores: one thread each avoids oversubscription stalls.
    torch.set_num_threads(1)
    # A native abort (gloo) then shows where Python was.
    faulthandler.enable(all_threads=True)
    fn(rank, *args)
    # Skip interpreter finalization: under CPU load, gloo's threads occasionally abort
    # the C++ static destructors of a process whose work is done ("terminate called
    # without an active exception", no Python frame). The test's outcome is already known.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> None:
    """Run `fn(rank, *args)` on `world_size` spawned processes; `fn` must be importable
    (a module-level function of a test file)."""
    ctx = mp.start_processes(
        _worker, args=(fn, world_size, free_port(), args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not _join(ctx, max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"distributed test {fn.__name__} on {world_size} processes hung for {timeout:.0f} s")


def _join(ctx: mp.ProcessContext, timeout: float) -> bool:
    try:
        return ctx.join(timeout=timeout)
    except mp.ProcessRaisedException as e:
        # The child's traceback is the useful part; spawn's own frames are noise.
        raise AssertionError(str(e)) from None
