"""torchtitan's own Llama 3 training step on one GPU, timed exactly as
train_throughput.py times ft, so the two can sit side by side (workload b:
Llama-3.1-8B shape, pure bf16, 4 x 2048 tokens per step, torch.compile +
selective activation checkpointing, AdamW).

Not torchtitan's trainer (it wants a dataset download, a tokenizer, tensorboard):
its pieces, in the order `torchtitan.train.Trainer` uses them for one device
(no FSDP, TP, CP or PP; gradient accumulation 1):

- model: `torchtitan.models.llama3.llama3_args[flavor]` (`8B`: dim 4096, 32 layers,
  32 heads, 8 KV heads, FFN 14336, vocab 128256), `update_from_config` (max_seq_len =
  seq_len), built on meta under `set_default_dtype(training.dtype)`, then
  `parallelize_llama`, `to_empty(device)`, `init_weights()` under no_grad, `train()`;
- job config: `JobConfig()` defaults with what torchtitan's
  `llama3_8b.toml` sets (lr 3e-4, eps 1e-8, warm-up 200, max_norm 1.0, selective
  AC `op`) and: `training.dtype = "bfloat16"` (pure bf16: parameters, gradients
  and AdamW states in bf16), `compile.enable = True` with components
  ["model", "loss"] (per-TransformerBlock `torch.compile(fullgraph=True)` after AC,
  and the compiled cross-entropy), local batch and seq_len from the arguments;
- precision: with one device `maybe_enable_amp` returns `torch.autocast(bf16)`
  (training.mixed_precision_param), which wraps forward and loss as in the trainer
  (a no-op for the bf16 matmuls; the loss upcasts logits to fp32 itself);
- AC: `apply_ac` with torchtitan's `_op_sac_save_list` (op-level SAC: save mm outputs
  except every second one, SDPA outputs, max; recompute the rest);
- optimizer: `build_optimizers` -> `torch.optim.AdamW(lr=3e-4, betas=(0.9, 0.95),
  eps=1e-8, weight_decay=0.1, fused=True)` (optimizer.implementation "fused");
  `build_lr_schedulers` (linear warm-up 200 steps);
- step: `Trainer.train_step` for one micro-batch: zero_grad, valid-token count on the
  host, `.to(device)`, forward + `cross_entropy_loss` (sum, fp32 logits) / valid
  tokens, backward, `dist_utils.clip_grad_norm_(foreach=True, pp_mesh=None)`,
  optimizer and scheduler step; `GarbageCollection(gc_freq=50)` (Python's automatic
  GC off, a collection every 50 steps) as the trainer's loop runs it. Not run:
  metrics logging (a host sync every `log_freq` steps), checkpointing, profiling.
- data: random tokens, rows of seq_len + 1 split into input / labels as torchtitan's
  text dataset does (every position has a target), 3 batches cycled, on the host
  (the dataloader hands CPU tensors over; pin_memory is off by default).
- process group: torchtitan's `init_distributed` (one process; on the CPU smoke test a
  gloo group first, and the CPU device type for the mesh, which torchtitan assumes
  is an accelerator).
- launcher: torchtitan's run_train.sh sets PYTORCH_ALLOC_CONF=expandable_segments:True;
  so does this script unless the variable is set or `--alloc-conf ''` is given.

Timing, MFU and memory are `common.py`'s (warm-up, CUDA events around the window
and each step, FLOPs per token from `ft.models.model_flops_per_token` for the
`8B` flavor, i.e. llama3_1_8b; torchtitan's own count is recorded beside it).

Import placeholders: importing `torchtitan.models.llama3` pulls in its data loader
(`datasets`, `torchdata`), tokenizer (`tokenizers`), metrics (`torch.utils.tensorboard`
-> `tensorboard`), config CLI (`tyro`) and, through its float8 converter, the MoE kernels (`triton`,
absent on CPU machines only). None of them is reached by the step. The small ones (tyro,
torchdata) are carried as wheels in `.whl/` and installed by run_steps.sh; any of
these that still fails to import is replaced by a placeholder module whose
attributes raise when used (for triton: torchtitan's MoE kernel module, so that
torch itself never sees a fake triton) (listed in the JSON under `placeholder_modules`).

    python3 benchmarks/torchtitan_baseline.py --flavor 8B --batch 4 --seq 2048 \\
        --warmup 5 --steps 15 --out tt_b.json
    python3 benchmarks/torchtitan_baseline.py --device cpu --tiny      # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import os
import socket
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# torchtitan's run_train.sh launches training with this allocator setting.
TORCHTITAN_ALLOC_CONF = "expandable_segments:True"


def _set_alloc_conf_before_torch() -> None:
    """PYTORCH_ALLOC_CONF from --alloc-conf unless the environment sets one; before torch loads."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--alloc-conf", default=TORCHTITAN_ALLOC_CONF)
    value = pre.parse_known_args()[0].alloc_conf
    if value and "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_ALLOC_CONF"] = value


if __name__ == "__main__":
    _set_alloc_conf_before_torch()

import common  # noqa: E402
import torch  # noqa: E402

# torchtitan flavors with an ft arch of the same shape: MFU uses ft's FLOP count.
FT_ARCH_OF_FLAVOR = {"8B": "llama3_1_8b"}

# Imported by torchtitan modules this script loads, used only by its data loader,
# metrics writer and CLI parser; the attribute names are the ones torchtitan imports.
UNUSED_PATH_MODULES = {
    "datasets": ["Dataset", "load_dataset"],
    "datasets.distributed": ["split_dataset_by_node"],
    "torchdata.stateful_dataloader": ["StatefulDataLoader"],
    "torch.utils.tensorboard": ["SummaryWriter"],
    "tyro": ["cli", "constructors"],
    "tokenizers": ["AddedToken", "Tokenizer"],  # transformers' dependency: normally the real one
}


def _placeholder(module: str, names: list[str]) -> types.ModuleType:
    """A module whose attributes are classes that raise on use: enough for
    torchtitan's `from X import Y`, class bases, annotations and isinstance."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{module} is a placeholder in torchtitan_baseline.py (not installed)")

    class Refusing:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            refuse()

        def __getattr__(self, name: str) -> Any:  # tyro.constructors.ConstructorRegistry() etc.
            return Refusing

    placeholder = types.ModuleType(module)
    placeholder.__path__ = []  # a package, for `datasets.distributed`
    for name in names:
        setattr(placeholder, name, type(name, (Refusing,), {}))
    if module == "tyro":  # config/manager.py builds a registry at import: give it an inert one
        placeholder.constructors = types.SimpleNamespace(  # type: ignore[attr-defined]
            ConstructorRegistry=lambda: types.SimpleNamespace(primitive_rule=lambda fn: fn),
            PrimitiveTypeInfo=Refusing, PrimitiveConstructorSpec=Refusing)
    return placeholder


def install_placeholders() -> list[str]:
    """Placeholders for the unused-path modules that do not import (see the module doc)."""
    used = []
    for module, names in UNUSED_PATH_MODULES.items():
        try:
            importlib.import_module(module)
        except Exception:  # missing, or too old for this torch / typing_extensions
            parent, _, child = module.rpartition(".")
            if parent and parent not in sys.modules:  # `torchdata` itself missing
                sys.modules[parent] = _placeholder(parent, [])
            sys.modules[module] = _placeholder(module, names)
            if parent:
                setattr(sys.modules[parent], child, sys.modules[module])
            used.append(module)
    if importlib.util.find_spec("triton") is None:  # CPU machines: MoE's triton kernels, unused by dense Llama
        module = "torchtitan.models.moe.kernels"
        sys.modules[module] = _placeholder(module, ["generate_permute_indices", "fill_indices_wrapper"])
        used.append(module)
    return used


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(device: torch.device, dump_folder: str) -> Any:
    """One process, as torchtitan's trainer initializes it under torchrun."""
    import torchtitan.distributed.parallel_dims as parallel_dims_module
    import torchtitan.distributed.utils as dist_utils
    from torchtitan.config import JobConfig

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        os.environ.setdefault(key, value)
    if device.type == "cpu":
        # torchtitan takes the device type to be "cuda" when no accelerator exists; the smoke test runs on CPU.
        parallel_dims_module.device_type = dist_utils.device_type = "cpu"
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    else:
        torch.cuda.set_device(device)
    dist_utils.init_distributed(JobConfig().comm, enable_cpu_backend=False, base_folder=dump_folder)
    return dist_utils


def job_config(args: argparse.Namespace, dump_folder: str) -> Any:
    """JobConfig defaults plus what llama3_8b.toml sets, and this benchmark's shape,
    precision and compile (see the module doc)."""
    from torchtitan.config import JobConfig

    jc = JobConfig()
    jc.job.dump_folder = dump_folder
    jc.model.name, jc.model.flavor = "llama3", args.flavor
    jc.optimizer.name, jc.optimizer.lr, jc.optimizer.eps = "AdamW", 3e-4, 1e-8
    jc.optimizer.implementation = "fused" if args.device == "cuda" else "foreach"  # fused AdamW needs an accelerator
    jc.lr_scheduler.warmup_steps = 200
    jc.training.local_batch_size, jc.training.seq_len = args.batch, args.seq
    jc.training.max_norm, jc.training.steps = 1.0, 1000
    jc.training.dtype = args.dtype
    jc.training.mixed_precision_param = "bfloat16"
    jc.parallelism.data_parallel_shard_degree = -1
    jc.activation_checkpoint.mode = args.ac
    jc.activation_checkpoint.selective_ac_option = "op"
    jc.compile.enable = args.compile
    jc.compile.components = ["model", "loss"]
    return jc


def settings_of(jc: Any, amp: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    defaults = optimizer.defaults
    return {
        "training.dtype": jc.training.dtype,
        "training.mixed_precision_param": jc.training.mixed_precision_param,
        "autocast": f"torch.autocast({amp.device}, {amp.fast_dtype})" if isinstance(amp, torch.autocast) else "none",
        "activation_checkpoint": {"mode": jc.activation_checkpoint.mode,
                                  "selective_ac_option": jc.activation_checkpoint.selective_ac_option,
                                  "preserve_rng_state": jc.activation_checkpoint.preserve_rng_state},
        "compile": {"enable": jc.compile.enable, "components": jc.compile.components, "backend": jc.compile.backend},
        "optimizer": {"class": type(optimizer).__name__, "lr": defaults["lr"], "betas": defaults["betas"],
                      "eps": defaults["eps"], "weight_decay": defaults["weight_decay"],
                      "fused": defaults.get("fused"), "foreach": defaults.get("foreach")},
        "lr_scheduler": {"warmup_steps": jc.lr_scheduler.warmup_steps, "decay_type": jc.lr_scheduler.decay_type},
        "max_norm": jc.training.max_norm,
        "gc_freq": jc.training.gc_freq,
        "fsdp": False,
        "PYTORCH_ALLOC_CONF": os.environ.get("PYTORCH_ALLOC_CONF"),
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="8B", help="torchtitan llama3 flavor (8B; debugmodel with --tiny)")
    parser.add_argument("--batch", type=int, default=4, help="rows per step (training.local_batch_size)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row (training.seq_len)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="training.dtype: bfloat16 = pure bf16; float32 = fp32 weights under autocast")
    parser.add_argument("--ac", default="selective", choices=["selective", "full", "none"])
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="compile is on by default on CUDA")
    parser.add_argument("--alloc-conf", default=TORCHTITAN_ALLOC_CONF,
                        help="PYTORCH_ALLOC_CONF when the environment sets none (default: torchtitan's "
                             "run_train.sh value; '' for none); applied before torch loads")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="debugmodel flavor, 2 x 64 tokens: a CPU smoke test")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 15; tiny 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON to this file")
    parser.add_argument("--profile-dir", type=Path, default=None,
                        help="after timing, profile 2 more steps; top kernels to DIR/torchtitan.txt")
    parser.add_argument("--max-memory-gib", type=float, default=70.0)
    args = parser.parse_args(argv)
    if args.tiny:
        args.flavor, args.batch, args.seq = "debugmodel", 2, 64
    args.compile = args.compile and args.device == "cuda"  # inductor on CPU needs minutes: smoke tests run eager
    warmup, steps = common.resolve_steps(args)

    placeholders = install_placeholders()
    import torchtitan
    from torchtitan.components.loss import IGNORE_INDEX, build_cross_entropy_loss
    from torchtitan.components.lr_scheduler import build_lr_schedulers
    from torchtitan.components.optimizer import build_optimizers
    from torchtitan.config import TORCH_DTYPE_MAP
    from torchtitan.distributed import ParallelDims
    from torchtitan.models.llama3 import llama3_args, parallelize_llama
    from torchtitan.models.llama3 import Transformer
    from torchtitan.tools import utils as tt_utils

    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device(args.device)
    dump_folder = tempfile.mkdtemp(prefix="torchtitan_baseline_")
    dist_utils = init_process_group(device, dump_folder)
    jc = job_config(args, dump_folder)

    peak = common.measure_matmul_peak(device, tiny=args.tiny)
    spec_tflops = common.spec_peak_tflops(device)
    model_args = dataclasses.replace(llama3_args[args.flavor])  # a copy: update_from_config edits it
    model_args.update_from_config(jc)
    arch = FT_ARCH_OF_FLAVOR.get(args.flavor)
    header: dict[str, Any] = {
        "benchmark": "torchtitan_baseline", "workload": "b" if args.flavor == "8B" else None,
        "torchtitan": torchtitan.__version__, "placeholder_modules": placeholders, "tiny": args.tiny,
        "environment": common.environment(device), "matmul_peak": peak, "spec_peak_tflops": spec_tflops,
        "warmup_steps": warmup, "timed_steps": steps, "model_args": dataclasses.asdict(model_args),
    }
    print(f"torchtitan {torchtitan.__version__} llama3 {args.flavor} on {header['environment']['device_name']}: "
          f"matmul peak {peak['tflops']:.0f} TFLOP/s; placeholders: {placeholders or 'none'}", flush=True)
    writer = common.ResultWriter(args.out, header)

    name = f"torchtitan_{'bf16' if args.dtype == 'bfloat16' else 'mixed'}_{'compile' if args.compile else 'eager'}" + (
        f"_ac-{args.ac}" if args.ac != "none" else "")
    result: dict[str, Any] = {
        "name": name, "impl": "torchtitan", "precision": "bf16" if args.dtype == "bfloat16" else "mixed",
        "compile": args.compile, "activation_checkpointing": args.ac, "rows": "full", "fp8": "none",
        "batch_size": args.batch, "seq_len": args.seq,
    }
    try:
        setup_start = time.perf_counter()
        common.reset_peak_memory(device)
        torch.manual_seed(args.seed)
        parallel_dims = ParallelDims(dp_shard=-1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
        with torch.device("meta"), tt_utils.set_default_dtype(TORCH_DTYPE_MAP[jc.training.dtype]):
            model = Transformer(model_args)
        _, tt_flops_per_token = model_args.get_nparams_and_flops(model, args.seq)
        model = parallelize_llama(model, parallel_dims, jc)
        model.to_empty(device=device)
        with torch.no_grad():
            model.init_weights(buffer_device=None)
        model.train()
        model_parts = [model]
        loss_fn = build_cross_entropy_loss(jc)
        optimizers = build_optimizers(model_parts, jc.optimizer, parallel_dims)
        lr_schedulers = build_lr_schedulers(optimizers, jc.lr_scheduler, jc.training.steps)
        train_context = dist_utils.get_train_context(False)
        amp = dist_utils.maybe_enable_amp(parallel_dims, jc.training.mixed_precision_param, device.type)
        gc_handler = tt_utils.GarbageCollection(gc_freq=jc.training.gc_freq, debug=jc.training.gc_debug)
        pp_mesh = parallel_dims.get_optional_mesh("pp")

        if arch is not None:
            from ft.models import find_arch, model_flops_per_token

            flops_per_token, flops_source = model_flops_per_token(find_arch(arch)[1], args.seq), f"ft {arch}"
        else:
            flops_per_token, flops_source = tt_flops_per_token, "torchtitan"
        writer.set("flops_per_token", flops_per_token)
        writer.set("flops_per_token_source", flops_source)
        writer.set("torchtitan_flops_per_token", tt_flops_per_token)
        writer.set("settings", settings_of(jc, amp, optimizers.optimizers[0]))

        gen = torch.Generator().manual_seed(args.seed)
        rows = [torch.randint(0, model_args.vocab_size, (args.batch, args.seq + 1), generator=gen) for _ in range(3)]
        batches = [({"input": r[:, :-1].contiguous()}, r[:, 1:].contiguous()) for r in rows]
        step_no = 0

        def step() -> common.StepCounts:
            # Trainer.train / train_step / forward_backward_step, one micro-batch, no PP.
            nonlocal step_no
            step_no += 1
            gc_handler.run(step_no)
            optimizers.zero_grad()
            input_dict, labels = batches[step_no % len(batches)]
            local_valid_tokens = torch.tensor(0, dtype=torch.int64)
            local_valid_tokens += (labels != IGNORE_INDEX).sum()
            global_valid_tokens = local_valid_tokens.to(device).float()
            inputs, labels = input_dict["input"].to(device), labels.to(device)
            with train_context():
                with amp:
                    pred = model(inputs)
                    loss_sum = loss_fn(pred, labels)
                    loss = loss_sum / global_valid_tokens
                del pred
                loss.backward()
            dist_utils.clip_grad_norm_([p for m in model_parts for p in m.parameters()], jc.training.max_norm,
                                       foreach=True, pp_mesh=pp_mesh, ep_enabled=parallel_dims.ep_enabled)
            optimizers.step()
            lr_schedulers.step()
            loss = torch.sum(torch.stack([loss.detach()]))
            n = labels.numel()
            return common.StepCounts(tokens=n, targets=n, computed=n, flops=n * flops_per_token, loss=loss)

        timing = common.time_training(step, device=device, warmup=warmup, steps=steps, setup_start=setup_start)
        result.update(timing.summary(peak_tflops=peak["tflops"], spec_tflops=spec_tflops))
        result.update(common.peak_memory(device))
        reserved = result.get("peak_memory_reserved_gib")
        result["within_memory_limit"] = None if reserved is None else reserved <= args.max_memory_gib
        if args.profile_dir is not None:
            common.profile_steps(step, device=device, path=args.profile_dir / "torchtitan.txt")
        result["status"] = "ok"
    except Exception as error:  # keep the header and the reason in the JSON
        result = {**result, **common.error_result(name, error)}
    writer.add(result)
    if result.get("status") == "ok" and args.flavor == "8B":
        from train_throughput import TORCHTITAN_8B_TOKENS_PER_S

        writer.set("ratios", {f"{name} / earlier torchtitan figure {TORCHTITAN_8B_TOKENS_PER_S}":
                              result["tokens_per_s"] / TORCHTITAN_8B_TOKENS_PER_S})
    with contextlib.suppress(Exception):
        torch.distributed.destroy_process_group()
    return 0 if result.get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
