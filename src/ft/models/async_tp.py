"""Asynchronous tensor parallelism: torch's micro-pipeline TP pass splits each
sequence-parallel all-gather + matmul and matmul + reduce-scatter into pieces that
overlap communication with compute (through CUDA symmetric memory), so TP costs
less on NVLink. It works on compiled regions only, on CUDA, and only with sequence
parallelism (plain TP's all-reduces are not decomposed).
"""

from __future__ import annotations

import logging

from ft.errors import ConfigError

log = logging.getLogger("ft")


def check_async_tp(*, enabled: bool, device_type: str, compiled: bool, tp_size: int, sequence_parallel: bool) -> None:
    """ConfigError naming what async TP needs that this run lacks."""
    if not enabled:
        return
    if tp_size == 1 or not sequence_parallel:
        raise ConfigError("config key 'async_tensor_parallel' needs tensor_parallel_size > 1 and "
                          "sequence_parallel=true (it overlaps sequence parallelism's all-gathers and reduce-scatters)")
    if device_type != "cuda":
        raise ConfigError(f"config key 'async_tensor_parallel' runs on CUDA GPUs only (device is {device_type}, "
                          "which has no symmetric memory); use async_tensor_parallel=false")
    if not compiled:
        raise ConfigError("config key 'async_tensor_parallel' is a torch.compile pass: set torch_compile=true "
                          "(or auto on a GPU)")


def enable_async_tp(tp_group_name: str) -> None:
    """Turn on the micro-pipeline pass for the regions compiled from now on, with symmetric
    memory for the TP group (newer torch enables it by itself)."""
    import torch._inductor.config as inductor_config

    inductor_config._micro_pipeline_tp = True
    try:
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group
    except ImportError:
        pass
    else:
        enable_symm_mem_for_group(tp_group_name)
    log.info("asynchronous tensor parallelism on (TP group %s)", tp_group_name)
