"""LoRA and QLoRA on one GPU: ft against transformers + PEFT, side by side in one
process, one workload per invocation:

  throughput  llama3_1_8b shape, LoRA rank 16 (alpha 32) on all seven projections,
              rows of 4096 (`--batch-size`, default 2), tokens/s and MFU
  memory      llama3_1_8b shape, 2 rows of 2048 through the packed (document-masked)
              path, peak memory of LoRA and QLoRA (NF4 base, torchao)

Variant names are words joined by `_`: `ft` or `hf_peft`, `lora` or `qlora`, then
`compile`, `ac` (full activation checkpointing; selective with `compile`; HF:
gradient checkpointing), `offload` (ft: `activation_offloading`, which under full
checkpointing sends each block's input to pinned host memory until its recompute)
`bf16` (ft: pure bf16, `mixed_precision=false`: adapters and their AdamW states
in bf16 as torchtune's published figures, instead of float32 under autocast) and
`hostemb` (ft: `lora.embeddings_on_host`, the frozen input embedding table in pinned
host memory, only the looked-up rows sent to the GPU), `fp8` / `fp8rowwise` (ft: the
recipe's `fp8=tensorwise|rowwise` with LoRA: the frozen base linears cast to float8 once,
forward and input-gradient matmuls in float8, `ft.lora.float8_base`; its MFU is a
fraction of the bf16 peak, as for full fine-tuning in float8).

ft runs the recipe's step (`common.FtTrainer`: accumulate_gradients + clip + fused
AdamW over the adapters only) on a model built as the recipe builds it
(`create_model` with `ft.lora.training.with_lora` before `parallelize_model`):
frozen base in bf16, adapters in fp32 under bf16 autocast. The baseline is
transformers' `LlamaForCausalLM` (bf16, sdpa) wrapped by `peft.get_peft_model`
with the same LoRA config (PEFT keeps its adapters in fp32 by default), the loss
from `labels=`, fused AdamW over the trainable parameters, bf16 autocast; its QLoRA
variant needs bitsandbytes and is recorded as skipped without it.
Weights are random (the cost does not depend on them). Peak memory is measured
over the timed steps (after warm-up: steady state, optimizer states included).

MFU is given two ways: `mfu_measured_peak` with torchtitan's count (6 x parameters
per token, as torchtune and NeMo Automodel report LoRA runs), and
`mfu_lora_count_measured_peak`, which drops the weight-gradient FLOPs frozen weights
never compute (2 x frozen parameters per token) and adds 6 x adapter parameters.

Run `python benchmarks/lora_train.py --workload throughput --out lora_throughput.json`;
`--device cpu --tiny` is a smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import memory_profile  # noqa: E402
import torch  # noqa: E402

from ft.gang import setup_gangs, teardown_gangs  # noqa: E402
from ft.lora import LoraConfig  # noqa: E402
from ft.lora.training import start_lora, with_lora  # noqa: E402
from ft.models import create_model, family_of, find_arch, model_flops_per_token  # noqa: E402
from ft.models.parallelize import parallelize_model  # noqa: E402
from ft.training.memory_model import GIB, MemoryPlan, predict_memory  # noqa: E402

NEMO_AUTOMODEL_TOKENS_PER_S = 12_473  # NeMo Automodel, Llama-3.1-8B LoRA, one H100
TORCHTUNE_PEAK_GIB = {"lora": 16.2, "qlora": 7.4}  # torchtune, Llama-3.1-8B, 2 x 2048 packed

WORKLOADS: dict[str, dict[str, Any]] = {
    "throughput": {"arch": "llama3_1_8b", "seq_len": 4096, "batch_size": 2, "packed": False,
                   "variants": ["ft_lora_compile", "ft_lora_compile_ac", "ft_lora_compile_fp8",
                                "ft_lora_compile_fp8rowwise", "hf_peft_lora", "hf_peft_lora_compile_ac"]},
    "memory": {"arch": "llama3_1_8b", "seq_len": 2048, "batch_size": 2, "packed": True,
               "variants": ["ft_lora_ac", "ft_qlora_ac", "ft_lora_ac_offload", "ft_qlora_ac_offload",
                            "ft_lora_bf16_ac_offload", "ft_qlora_bf16_ac_offload",
                            "ft_lora_bf16_ac_offload_hostemb", "ft_qlora_bf16_ac_offload_hostemb",
                            "hf_peft_lora_ac", "hf_peft_qlora_ac"]},
}
VARIANT_WORDS = {"ft", "hf", "peft", "lora", "qlora", "compile", "ac", "offload", "bf16", "hostemb", "fp8",
                 "fp8rowwise"}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    impl: str  # "ft" | "hf"
    quantization: str  # "none" | "nf4"
    compile: bool
    ac: str  # "none" | "selective" | "full" (HF: gradient checkpointing unless "none")
    offload: bool = False  # ft: activation_offloading
    precision: str = "mixed"  # ft: "mixed" (float32 adapters under bf16 autocast) | "bf16" (pure)
    host_embeddings: bool = False  # ft: lora.embeddings_on_host
    fp8: str = "none"  # ft: the recipe's fp8 key (a float8 frozen base)


def parse_variant(name: str) -> Variant:
    words = set(name.split("_"))
    if not words <= VARIANT_WORDS or not words & {"lora", "qlora"}:
        raise ValueError(f"variant {name!r}: its words must be among {sorted(VARIANT_WORDS)}, with lora or qlora")
    impl = "hf" if "hf" in words else "ft"
    if impl == "hf" and words & {"offload", "bf16", "hostemb", "fp8", "fp8rowwise"}:
        raise ValueError(f"variant {name!r}: offload, bf16, hostemb, fp8 and fp8rowwise are ft variants")
    fp8 = "rowwise" if "fp8rowwise" in words else "tensorwise" if "fp8" in words else "none"
    # Uncompiled ft variants (the memory workload) take the smallest activation footprint.
    ac = "none" if "ac" not in words else ("selective" if impl == "ft" and "compile" in words else "full")
    return Variant(name=name, impl=impl, quantization="nf4" if "qlora" in words else "none",
                   compile="compile" in words, ac=ac, offload="offload" in words,
                   precision="bf16" if "bf16" in words else "mixed", host_embeddings="hostemb" in words, fp8=fp8)


def tiny_config(arch: str) -> Any:
    real = find_arch(arch)[1]
    return dataclasses.replace(real, vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160,
                               max_seq_len=16384, bos_id=1, eos_id=2)


def lora_flops_per_token(config: Any, seq_len: int, lora_params: int) -> float:
    """torchtitan's count without the frozen weights' gradients, plus the adapters' full cost."""
    from ft.models.family import parameter_count

    dense = parameter_count(config, include_embeddings=False) + config.vocab_size * config.dim
    return model_flops_per_token(config, seq_len) - 2 * dense + 6 * lora_params


def build_ft(config: Any, variant: Variant, lora: LoraConfig, gangs: Any, *, seed: int) -> torch.nn.Module:
    lora = dataclasses.replace(lora, base_quantization=variant.quantization, embeddings_on_host=variant.host_embeddings)

    def parallelize(model):
        return parallelize_model(model, gangs, activation_checkpointing=variant.ac, compile=variant.compile)

    # The recipe's rule: float32 master adapters under mixed precision, else the compute dtype.
    mixed = variant.precision == "mixed"
    model = create_model(config, device=gangs.device, dtype=torch.float32 if mixed else torch.bfloat16, seed=seed,
                         parallelize=with_lora(parallelize, lora, base_dtype=torch.bfloat16,
                                               adapter_dtype=torch.float32 if mixed else torch.bfloat16))
    start_lora(model, lora, seed=seed, resuming=False, dtype=torch.bfloat16, fp8=variant.fp8)
    model.train()
    return model


def predicted_peak_gib(variant: Variant, config: Any, spec: dict[str, Any], loss_chunk_size: int) -> float:
    """The memory model's peak for this variant (what `--dry-run` would print), beside the measured one."""
    plan = MemoryPlan(model_config=config, mixed_precision=variant.precision == "mixed",
                      activation_checkpointing=variant.ac, activation_offloading=variant.offload,
                      max_num_tokens=spec["seq_len"] * spec["batch_size"], loss_chunk_size=loss_chunk_size,
                      lora_rank=16, lora_nf4=variant.quantization == "nf4", lora_fp8=variant.fp8 != "none",
                      lora_embeddings_on_host=variant.host_embeddings, compiled=variant.compile)
    return round(predict_memory(plan).peak / GIB, 2)


def build_hf(config: Any, variant: Variant, lora: LoraConfig, device: torch.device, *, seed: int):
    import peft
    import transformers

    values = family_of(config).hf_config(config)
    values.pop("torch_dtype", None)
    hf_config = transformers.LlamaConfig(**values)
    hf_config.use_cache = False
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {}
    if variant.quantization == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise _Skip("transformers + PEFT QLoRA needs bitsandbytes, which is not installed") from None
        raise _Skip("QLoRA through bitsandbytes needs a checkpoint to quantize on load; not measured on random weights")
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(hf_config, attn_implementation="sdpa",
                                                           dtype=torch.bfloat16, **kwargs)
    if variant.ac != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                                  target_modules=lora.target_modules, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, peft_config)
    model.train()
    return model


class _Skip(Exception):
    pass


def make_step(variant: Variant, config: Any, spec: dict[str, Any], gangs: Any, args: argparse.Namespace,
              lora: LoraConfig) -> tuple[Callable[[], common.StepCounts], torch.nn.Module, float]:
    device = gangs.device
    seq_len, batch_size = spec["seq_len"], spec["batch_size"]
    generator = torch.Generator().manual_seed(args.seed)
    batch = common.random_full_rows(batch_size=batch_size, seq_len=seq_len, vocab_size=config.vocab_size,
                                    generator=generator, through_packed_path=spec["packed"])
    if variant.impl == "ft":
        model = build_ft(config, variant, lora, gangs, seed=args.seed)
        trainer = common.FtTrainer(model, gangs, common.ft_autocast(device, variant.precision), args.loss_chunk_size,
                                   activation_offloading=variant.offload)

        def run() -> torch.Tensor:
            return trainer.step([batch]) / batch.num_target_tokens
    else:
        model = build_hf(config, variant, lora, device, seed=args.seed)
        forward = torch.compile(model) if variant.compile else model
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                      **({"fused": True} if device.type == "cuda" else {"foreach": True}))
        autocast = common.ft_autocast(device, "mixed")

        def run() -> torch.Tensor:
            input_ids = batch.tokens_BT.to(device, non_blocking=True)
            with autocast:
                loss = forward(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = model_flops_per_token(config, seq_len) * batch.num_tokens

    def step() -> common.StepCounts:
        loss = run()
        return common.StepCounts(tokens=batch.num_tokens, targets=batch.num_target_tokens,
                                 computed=batch.num_tokens, flops=flops, loss=loss)

    return step, model, lora_params


def run_variant(variant: Variant, config: Any, spec: dict[str, Any], gangs: Any, args: argparse.Namespace,
                warmup: int, steps: int, ctx: dict[str, Any]) -> dict[str, Any]:
    device = gangs.device
    start = time.perf_counter()
    try:
        step, model, lora_params = make_step(variant, config, spec, gangs, args, LoraConfig(enabled=True, rank=16,
                                                                                              alpha=32.0))
    except _Skip as reason:
        return {"name": variant.name, "status": "skipped", "reason": str(reason)}
    timing = common.time_training(step, device=device, warmup=warmup, steps=steps, setup_start=start)
    result = {"name": variant.name, "status": "ok", **dataclasses.asdict(variant), "trainable_params": lora_params,
              **timing.summary(peak_tflops=ctx["peak_tflops"], spec_tflops=ctx["spec_tflops"]),
              **common.peak_memory(device)}
    if variant.impl == "ft":
        result["predicted_peak_gib"] = predicted_peak_gib(variant, config, spec, args.loss_chunk_size)
    if args.profile_memory:
        result["memory_profile"] = memory_profile.profile_peak(step, device)
        result["memory_by_tensor_kind"] = memory_profile.largest_tensors(model)
    lora_count = lora_flops_per_token(config, spec["seq_len"], lora_params)
    scale = lora_count / model_flops_per_token(config, spec["seq_len"])
    for key in ("mfu_measured_peak", "mfu_spec_peak"):
        result[key.replace("mfu_", "mfu_lora_count_")] = result[key] * scale if result[key] is not None else None
    del model, step
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    parser.add_argument("--variants", default="default", help="comma-separated names, or 'default'")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (throughput default 2)")
    parser.add_argument("--profile-memory", action="store_true",
                        help="one more step with the allocator's history: what is alive at the peak")
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    warmup, steps = common.resolve_steps(args)
    spec = dict(WORKLOADS[args.workload])
    if args.batch_size is not None:
        spec["batch_size"] = args.batch_size
    config = tiny_config(spec["arch"]) if args.tiny else find_arch(spec["arch"])[1]
    if args.tiny:
        spec.update(seq_len=64, batch_size=2)
    names = spec["variants"] if args.variants == "default" else args.variants.split(",")
    try:
        variants = [parse_variant(name) for name in names]  # a misspelt name fails before any setup
    except ValueError as error:
        parser.error(str(error))

    gangs = setup_gangs(device=args.device)
    device = gangs.device
    common.setup_torch(device)
    peak = common.measure_matmul_peak(device, tiny=args.tiny)
    ctx = {"peak_tflops": peak["tflops"], "spec_tflops": common.spec_peak_tflops(device)}
    header = {
        "benchmark": "lora_train", "workload": args.workload, "arch": spec["arch"], "tiny": args.tiny,
        "environment": common.environment(device), "matmul_peak": peak, "spec_peak_tflops": ctx["spec_tflops"],
        "warmup_steps": warmup, "timed_steps": steps, "lora": {"rank": 16, "alpha": 32.0, "target_modules": "all 7"},
        "flops_per_token": model_flops_per_token(config, spec["seq_len"]),
        "workload_spec": {k: v for k, v in spec.items() if k != "variants"},
        "published": {"nemo_automodel_tokens_per_s": NEMO_AUTOMODEL_TOKENS_PER_S,
                      "torchtune_peak_gib": TORCHTUNE_PEAK_GIB},
    }
    writer = common.ResultWriter(args.out, header)
    try:
        for variant in variants:
            try:
                result = run_variant(variant, config, spec, gangs, args, warmup, steps, ctx)
            except Exception as error:  # one variant's failure (OOM, compile error) must not lose the others
                result = common.error_result(variant.name, error)
            common.free_memory(device)
            writer.add(result)
        results = writer.doc["results"]
        if args.workload == "throughput":
            writer.set("ratio_ft_over_hf_peft", common.ratio(results, "ft_lora_compile", "hf_peft_lora"))
    finally:
        teardown_gangs(gangs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
