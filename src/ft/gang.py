"""Gangs: the process groups a trainer runs on, and how the launch is detected.

A `Gang` is one process group with the collectives recipes need (a gang of size 1
has no group and every collective is a no-op). `Gangs` holds the root gang (all
processes), the data-parallel gang and the tensor-parallel gang, all cut from one
`DeviceMesh`:

- `fsdp_replicas == 1`: a 2-D mesh `("dp", "tp")`;
- `fsdp_replicas > 1` (HSDP): a 3-D mesh `("dp_replicate", "dp_shard", "tp")`, with
  `("dp_replicate", "dp_shard")` also flattened to `"dp"` for the data gang;
- `pipeline_parallel_size > 1`: the same with a `"pp"` dimension in front (`pp` gang:
  the ranks of one pipeline, which read the same data).

Ranks are laid out tp-innermost: the tp ranks of one group are consecutive (one
node, NVLink), shards come next, then replicas, and pipeline stages outermost
(point-to-point traffic only, the cheapest to send across nodes).

One process (plain `python`, a single `srun` task, `torchrun --nproc-per-node 1`)
gets no process group at all and `mesh=None`.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, Mapping

import torch
import torch.distributed as dist

from ft.errors import ConfigError

ReduceOp = Literal["sum", "max", "min", "mean"]

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class Gang:
    """One process group as seen from this process: `rank` within it, `size`, `group`.

    `group` is None for a gang of one process; collectives are then no-ops.
    """

    def __init__(self, rank: int, size: int, group: dist.ProcessGroup | None) -> None:
        if size > 1 and group is None:
            raise ValueError(f"a gang of {size} processes needs a process group")
        self.rank, self.size, self.group = rank, size, group

    def __repr__(self) -> str:
        return f"Gang(rank={self.rank}, size={self.size})"

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> None:
        """Reduce `tensor` in place over the gang. "mean" divides the sum by the size
        (gloo has no AVG), so it needs a floating tensor."""
        if op not in ("sum", "max", "min", "mean"):
            raise ValueError(f"unknown reduce op {op!r}; use 'sum', 'max', 'min' or 'mean'")
        if self.size == 1:
            return
        dist.all_reduce(tensor, op=_REDUCE_OPS["sum" if op == "mean" else op], group=self.group)
        if op == "mean":
            tensor.div_(self.size)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """The `obj` of gang rank `src`, on every rank."""
        if self.size == 1:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, group=self.group, group_src=src)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)


@dataclass
class Gangs:
    """The gangs of one run. `mesh` is None for a single process (see module doc)."""

    root: Gang
    dp: Gang
    tp: Gang
    device: torch.device
    mesh: Any = None  # DeviceMesh | None; Any keeps this importable without distributed mesh support
    replicas: int = 1  # HSDP replica groups inside dp (fsdp_replicas)
    flat_dp_mesh: Any = None  # HSDP: ("dp_replicate", "dp_shard") flattened to 1-D "dp"
    owns_process_group: bool = False  # teardown destroys the default group only if we made it
    pp: Any = None  # Gang of this rank's pipeline (size 1 without pipeline parallelism)

    def __post_init__(self) -> None:
        if self.pp is None:
            self.pp = Gang(0, 1, None)

    @property
    def is_main(self) -> bool:
        return self.root.rank == 0

    @property
    def dp_mesh(self) -> Any:
        """The mesh FSDP shards over: 1-D `dp`, or 2-D `(dp_replicate, dp_shard)` for HSDP."""
        if self.mesh is None:
            return None
        if self.replicas > 1:
            return self.mesh["dp_replicate", "dp_shard"]
        return self.mesh["dp"]

    @property
    def dp_mesh_1d(self) -> Any:
        """All dp ranks as one 1-D mesh (DDP, and the dp gang's group)."""
        if self.mesh is None:
            return None
        return self.flat_dp_mesh if self.flat_dp_mesh is not None else self.mesh["dp"]

    @property
    def tp_mesh(self) -> Any:
        return None if self.mesh is None else self.mesh["tp"]

    @property
    def pp_mesh(self) -> Any:
        return None if self.mesh is None or self.pp.size == 1 else self.mesh["pp"]

    def __enter__(self) -> "Gangs":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # After an error another rank may be stuck in a collective: do not wait for it.
        teardown_gangs(self, synchronize=exc_type is None)


# ---------------------------------------------------------------------------------
# Launch detection


@dataclass(frozen=True)
class LaunchInfo:
    kind: Literal["single", "torchrun", "slurm"]
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None


def _env_int(env: Mapping[str, str], key: str) -> int:
    value = env.get(key)
    if value is None:
        raise ConfigError(f"the launch environment sets some distributed variables but not {key}")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {key}={value!r} is not an integer") from None


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list, e.g. "gpu[01-03,07],cpu3" ->
    ["gpu01", "gpu02", "gpu03", "gpu07", "cpu3"] (zero padding kept, several bracket
    groups in one name expand as a product), without calling `scontrol`."""
    hosts: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(nodelist + ","):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            item = nodelist[start:i].strip()
            if item:
                hosts.extend(_expand_host(item, nodelist))
            start = i + 1
    if depth != 0 or not hosts:
        raise ConfigError(f"cannot parse SLURM node list {nodelist!r}")
    return hosts


def _expand_host(item: str, nodelist: str) -> list[str]:
    parts = re.split(r"(\[[^\]]*\])", item)
    choices: list[list[str]] = []
    for part in parts:
        if not (part.startswith("[") and part.endswith("]")):
            choices.append([part])
            continue
        values: list[str] = []
        for rng in part[1:-1].split(","):
            lo, sep, hi = rng.partition("-")
            if not lo.isdigit() or (sep and not hi.isdigit()):
                raise ConfigError(f"cannot parse range {rng!r} in SLURM node list {nodelist!r}")
            width = len(lo)
            values.extend(str(n).zfill(width) for n in range(int(lo), int(hi if sep else lo) + 1))
        choices.append(values)
    return ["".join(p) for p in itertools.product(*choices)]


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """How this process was started.

    - torchrun (or any launcher setting `RANK` and `WORLD_SIZE`, which
      `TORCHELASTIC_RUN_ID` marks): ranks and master from its variables; they take
      precedence over Slurm's so `srun torchrun ...` works.
    - a task of `srun` (`SLURM_STEP_ID` set: an sbatch script itself is not one) with
      more than one task: `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS` (else
      `SLURM_NTASKS`), `SLURM_LOCALID`; master = first host of the step's (else the
      job's) node list, port = `10000 + job_id % 20000`; `MASTER_ADDR` /
      `MASTER_PORT` override both.
    - anything else: a single process.
    """
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env):
        world_size = _env_int(env, "WORLD_SIZE")
        if world_size == 1:
            return LaunchInfo(kind="single", local_rank=int(env.get("LOCAL_RANK", 0)))
        return LaunchInfo(
            kind="torchrun",
            rank=_env_int(env, "RANK"),
            world_size=world_size,
            local_rank=_env_int(env, "LOCAL_RANK"),
            master_addr=env.get("MASTER_ADDR") or _missing(env, "MASTER_ADDR"),
            master_port=_env_int(env, "MASTER_PORT"),
        )
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        world_size = int(env.get("SLURM_STEP_NUM_TASKS") or _env_int(env, "SLURM_NTASKS"))
        if world_size == 1:
            return LaunchInfo(kind="single", local_rank=int(env.get("SLURM_LOCALID", 0)))
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or _missing(env, "SLURM_JOB_NODELIST")
        if "MASTER_PORT" in env:
            port = _env_int(env, "MASTER_PORT")
        else:
            port = 10_000 + _env_int(env, "SLURM_JOB_ID") % 20_000
        return LaunchInfo(
            kind="slurm",
            rank=_env_int(env, "SLURM_PROCID"),
            world_size=world_size,
            local_rank=_env_int(env, "SLURM_LOCALID"),
            master_addr=env.get("MASTER_ADDR") or expand_slurm_nodelist(nodelist)[0],
            master_port=port,
        )
    return LaunchInfo(kind="single")


def _missing(env: Mapping[str, str], key: str) -> str:
    raise ConfigError(f"the launch environment sets some distributed variables but not {key}")


# ---------------------------------------------------------------------------------
# Setup / teardown


def check_layout(world_size: int, *, tensor_parallel_size: int, replicas: int, pipeline_parallel_size: int = 1) -> int:
    """The data-parallel size of `world_size` processes; ConfigError if impossible."""
    if pipeline_parallel_size < 1:
        raise ConfigError(f"pipeline_parallel_size={pipeline_parallel_size} must be at least 1")
    if world_size % pipeline_parallel_size:
        raise ConfigError(
            f"pipeline_parallel_size={pipeline_parallel_size} does not divide the {world_size} processes of this run; "
            f"use a divisor of {world_size}"
        )
    if pipeline_parallel_size > 1:
        world_size //= pipeline_parallel_size  # the processes of one pipeline stage
    if tensor_parallel_size < 1:
        raise ConfigError(f"tensor_parallel_size={tensor_parallel_size} must be at least 1")
    if replicas < 1:
        raise ConfigError(f"fsdp_replicas={replicas} must be at least 1")
    if world_size % tensor_parallel_size:
        raise ConfigError(
            f"tensor_parallel_size={tensor_parallel_size} does not divide the {world_size} processes of this run; "
            f"use a divisor of {world_size}"
        )
    dp = world_size // tensor_parallel_size
    if dp % replicas:
        raise ConfigError(
            f"fsdp_replicas={replicas} does not divide the data-parallel size {dp} "
            f"({world_size} processes / tensor_parallel_size={tensor_parallel_size}); use a divisor of {dp}"
        )
    return dp


def resolve_device(device: str, local_rank: int) -> torch.device:
    """"auto" -> cuda:local_rank if CUDA is available else cpu; "cuda" -> cuda:local_rank."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device={device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r} but CUDA is not available; use device=cpu or auto")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
        if resolved.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device cuda:{resolved.index} does not exist (this node has {torch.cuda.device_count()} GPUs); "
                "start at most one process per GPU"
            )
    return resolved


def setup_gangs(
    *,
    device: str = "auto",
    tensor_parallel_size: int = 1,
    replicas: int = 1,
    pipeline_parallel_size: int = 1,
    timeout: timedelta = timedelta(minutes=30),
    env: Mapping[str, str] | None = None,
) -> Gangs:
    """Detect the launch, check the layout, initialise torch.distributed if there is
    more than one process (NCCL for CUDA tensors plus gloo for CPU tensors on GPUs,
    gloo on CPU) and cut the mesh into gangs. Layout errors come before any
    process group exists, on every rank alike."""
    launch = detect_launch(env)
    dp_size = check_layout(launch.world_size, tensor_parallel_size=tensor_parallel_size, replicas=replicas,
                           pipeline_parallel_size=pipeline_parallel_size)
    dev = resolve_device(device, launch.local_rank)
    if launch.world_size == 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        single = Gang(0, 1, None)
        return Gangs(root=single, dp=single, tp=single, device=dev, mesh=None, replicas=1)

    from torch.distributed.device_mesh import init_device_mesh

    owns = False
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # gloo next to NCCL on GPUs: metric sums and object collectives may live on CPU.
        backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
        )
        owns = True
        global _process_group_used
        _process_group_used = True
    elif dist.get_world_size() != launch.world_size:
        raise RuntimeError(
            f"torch.distributed is already initialised with {dist.get_world_size()} processes, "
            f"the launch environment says {launch.world_size}"
        )

    pp = pipeline_parallel_size
    pp_shape, pp_names = ((pp,), ("pp",)) if pp > 1 else ((), ())
    if replicas > 1:
        mesh = init_device_mesh(
            dev.type, (*pp_shape, replicas, dp_size // replicas, tensor_parallel_size),
            mesh_dim_names=(*pp_names, "dp_replicate", "dp_shard", "tp"),
        )
        flat_dp = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    else:
        mesh = init_device_mesh(dev.type, (*pp_shape, dp_size, tensor_parallel_size),
                                mesh_dim_names=(*pp_names, "dp", "tp"))
        flat_dp = None

    def gang(sub) -> Gang:
        return Gang(sub.get_local_rank(), sub.size(), sub.get_group())

    root = Gang(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
    gangs = Gangs(
        root=root, dp=root, tp=root, device=dev, mesh=mesh, replicas=replicas, flat_dp_mesh=flat_dp,
        owns_process_group=owns,
    )
    gangs.dp, gangs.tp = gang(gangs.dp_mesh_1d), gang(gangs.tp_mesh)
    if pp > 1:
        gangs.pp = gang(mesh["pp"])
    return gangs


_process_group_used = False


def process_group_was_used() -> bool:
    """Whether this process set up a multi-process gang (see `ft.cli`'s exit)."""
    return _process_group_used


def teardown_gangs(gangs: Gangs, *, synchronize: bool = False) -> None:
    """Destroy the process group `setup_gangs` created (no-op for one process).

    `synchronize` first waits for every rank: a rank that destroys the group while a
    peer still finishes its last collective can abort the peer (gloo)."""
    if gangs.owns_process_group and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
    gangs.owns_process_group = False


teardown = teardown_gangs

__all__ = [
    "Gang", "Gangs", "LaunchInfo", "check_layout", "detect_launch", "expand_slurm_nodelist", "resolve_device",
    "setup_gangs", "teardown", "teardown_gangs",
]
