"""Single-GPU training throughput of ft against the Hugging Face baseline,
side by side in one process, one workload per invocation:

  a  llama3_2_1b, 8 x 2048 full rows of random tokens
  b  llama3_1_8b, 4 x 2048 full rows, the best settings that fit (activation
     checkpointing, compile; fp32 master weights do not fit one GPU: recorded as skipped)
  c  llama3_2_1b on GSM8K train lengths: ft packing rows of 2048 against HF batches
     of 16 and 32 examples padded to their longest (target and non-pad tokens/s)
  qwen3_8b  4 x 2048 full rows, as b (q/k norm, head_dim 128, 151936-entry vocabulary)

ft runs its real training step (`ft.training.step.accumulate_gradients`
+ clip + fused AdamW, see `common.FtTrainer`) on a model built and parallelized as the
recipe builds it (`ft.models.create_model` with `parallelize_model`).
The baseline is transformers' model of the family (`LlamaForCausalLM`,
`Qwen3ForCausalLM`, built from the family's `config.json`) of the same shape (random weights,
`attn_implementation="sdpa"`, loss from `labels=` as HF users compute it), a plain
PyTorch loop with fused AdamW and the same gradient clipping, eager or `torch.compile`d,
with gradient checkpointing where the ft variant checkpoints.

Precisions: `bf16` = parameters, gradients and AdamW states in bf16 (the
baseline table's precision); `mixed` = fp32 master weights computing in bf16 under autocast
(ft's default, `mixed_precision=True`). `ft_fp8_*` variants are `bf16` with the linear
layers computing in float8 (`fp8=tensorwise|rowwise`, torchao; skipped with the reason
where there is no float8 GPU or no torchao), compared with ft's bf16 variant of the same
settings and with the HF baseline.

GSM8K tokenizer (workload c): the Llama 3 tokenizer cannot be downloaded here, so the
script trains a byte-level BPE at start-up (HF `tokenizers`, Llama 3's pre-tokenizer
regex, 4500 pieces, on the GSM8K train questions and answers; ~5 s). With ft's GSM8K
format (BOS + question + "\\n", answer + EOS) it gives a median of 157 and a p95 of
287 tokens per example and 62% target tokens, against 157 / 278 / 60% with the Llama 3
tokenizer: the token counts, which are what the benchmark depends on, are Llama 3's.
The measured length statistics go into the JSON. Token ids are < 4500, which does
not change the cost: the model keeps its 128256-entry vocabulary.

Run `python benchmarks/train_throughput.py --workload a --out a.json` (see
benchmarks/README.md); `--device cpu --tiny` is a smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from ft.gang import setup_gangs, teardown_gangs  # noqa: E402
from ft.models import create_model, family_of, find_arch, model_flops_per_token  # noqa: E402
from ft.models.family import parameter_count  # noqa: E402
from ft.models.parallelize import parallelize_model  # noqa: E402
from ft.training import loss as ft_loss  # noqa: E402

TORCHTITAN_8B_TOKENS_PER_S = 10_797  # torchtitan's figure: 1 x H200, pure bf16, 4 x 2048, compile + selective AC


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    impl: str  # "ft" | "hf"
    precision: str  # "bf16" | "mixed"
    compile: bool
    ac: str = "none"  # "none" | "elementwise" | "selective" | "full" (HF: any value but "none" = gradient checkpointing)
    ac_blocks: int | None = None  # ft: checkpoint only the first N blocks (activation_checkpointing_blocks)
    rows: str = "full"  # ft: "full" (causal SDPA) | "packed" (doc-masked, flex) | "unpacked" (ft padded); hf: "full" | "padded"
    hf_batch: int = 0  # examples per HF padded batch (workload c)
    fp8: str = "none"  # ft: torchao float8 linears, "tensorwise" | "rowwise" (ft.models.fp8)
    optimizer: str = "fused"  # ft's AdamW: "fused" (torch's kernel) | "compiled" (ft.training.compiled_adamw)
    loss_chunk: int | None = None  # ft: tokens per loss chunk (None: --loss-chunk-size)
    loss_kernel: str = "compiled"  # ft: a loss chunk's softmax gradient, ft.training.loss.CHUNK_KERNELS


def _v(name: str, **kw: Any) -> Variant:
    return Variant(name=name, **kw)


WORKLOADS: dict[str, dict[str, Any]] = {
    "a": {
        "arch": "llama3_2_1b", "batch_size": 8, "seq_len": 2048,
        "goal": ">= 1.2x the compiled HF baseline and >= 70% of the measured matmul peak",
        "default": ["ft_bf16_compile", "hf_bf16_compile", "hf_bf16_eager", "ft_mixed_compile", "hf_mixed_compile"],
        "variants": [
            _v("ft_bf16_compile", impl="ft", precision="bf16", compile=True),
            _v("hf_bf16_compile", impl="hf", precision="bf16", compile=True),
            _v("hf_bf16_eager", impl="hf", precision="bf16", compile=False),
            _v("ft_mixed_compile", impl="ft", precision="mixed", compile=True),
            _v("hf_mixed_compile", impl="hf", precision="mixed", compile=True),
            _v("hf_mixed_eager", impl="hf", precision="mixed", compile=False),
            _v("ft_bf16_eager", impl="ft", precision="bf16", compile=False),
            # What the recipe does with full rows today: document ids -> the FlexAttention path.
            _v("ft_bf16_compile_packedpath", impl="ft", precision="bf16", compile=True, rows="packed"),
            _v("ft_bf16_compile_ac-selective", impl="ft", precision="bf16", compile=True, ac="selective"),
            _v("ft_bf16_compile_compiled-adamw", impl="ft", precision="bf16", compile=True, optimizer="compiled"),
            *[_v(f"ft_bf16_compile{opt}_chunk{n}", impl="ft", precision="bf16", compile=True,
                 optimizer="compiled" if opt else "fused", loss_chunk=n)
              for n in (2048, 4096, 16384) for opt in ("", "_compiled-adamw")],
            # The chunk's softmax gradient by ft's Triton kernel (ft.training.cross_entropy_kernel).
            _v("ft_bf16_compile_triton-loss", impl="ft", precision="bf16", compile=True, loss_kernel="triton"),
            *[_v(f"ft_bf16_compile_triton-loss{opt}_chunk16384", impl="ft", precision="bf16", compile=True,
                 loss_kernel="triton", loss_chunk=16384, optimizer="compiled" if opt else "fused")
              for opt in ("", "_compiled-adamw")],
            # bf16 parameters, gradients and AdamW states; the linears compute in float8.
            _v("ft_fp8_tensorwise_compile", impl="ft", precision="bf16", compile=True, fp8="tensorwise"),
            _v("ft_fp8_rowwise_compile", impl="ft", precision="bf16", compile=True, fp8="rowwise"),
        ],
    },
    "b": {
        "arch": "llama3_1_8b", "batch_size": 4, "seq_len": 2048,
        "goal": ">= 1.1x torchtitan's 10.8k tokens/s (>= 1.45x HF), peak memory <= 70 GiB",
        "default": ["ft_bf16_compile_ac-selective", "hf_bf16_eager_gc", "ft_bf16_compile_ac-full", "ft_mixed_compile_ac-selective"],
        "variants": [
            _v("ft_bf16_compile_ac-selective", impl="ft", precision="bf16", compile=True, ac="selective"),
            _v("hf_bf16_eager_gc", impl="hf", precision="bf16", compile=False, ac="full"),
            _v("ft_bf16_compile_ac-full", impl="ft", precision="bf16", compile=True, ac="full"),
            # Every matmul output kept, only the elementwise ops recomputed (70.3 GiB measured and predicted).
            _v("ft_bf16_compile_ac-elementwise", impl="ft", precision="bf16", compile=True, ac="elementwise"),
            _v("ft_bf16_compile_ac-elementwise_compiled-adamw", impl="ft", precision="bf16", compile=True,
               ac="elementwise", optimizer="compiled"),
            # 8B x 16 bytes (fp32 weights + grads + AdamW) = 128 GB: pre-flight skips it on one GPU.
            _v("ft_mixed_compile_ac-selective", impl="ft", precision="mixed", compile=True, ac="selective"),
            _v("hf_bf16_compile_gc", impl="hf", precision="bf16", compile=True, ac="full"),
            _v("ft_bf16_compile", impl="ft", precision="bf16", compile=True),
            _v("ft_bf16_eager_ac-selective", impl="ft", precision="bf16", compile=False, ac="selective"),
            _v("ft_fp8_tensorwise_compile_ac-selective", impl="ft", precision="bf16", compile=True, ac="selective",
               fp8="tensorwise"),
            _v("ft_fp8_rowwise_compile_ac-selective", impl="ft", precision="bf16", compile=True, ac="selective",
               fp8="rowwise"),
            # The last blocks keep all their activations: memory under the 70 GiB goal buys less recompute.
            # Predicted peaks (ft.training.memory_model; it over-predicts the all-selective run, 64.0
            # against 60.8 GiB measured): 30 blocks 65.2, 28 blocks 66.8, 24 blocks 70.0 GiB.
            _v("ft_bf16_compile_ac-selective-blocks30", impl="ft", precision="bf16", compile=True, ac="selective",
               ac_blocks=30),
            _v("ft_bf16_compile_ac-selective-blocks28", impl="ft", precision="bf16", compile=True, ac="selective",
               ac_blocks=28),
            _v("ft_bf16_compile_ac-selective-blocks24", impl="ft", precision="bf16", compile=True, ac="selective",
               ac_blocks=24),
            _v("ft_fp8_tensorwise_compile_ac-selective-blocks28", impl="ft", precision="bf16", compile=True,
               ac="selective", ac_blocks=28, fp8="tensorwise"),
            # Measured in bf16: 0.65 GiB per block left unchecked.
            _v("ft_fp8_tensorwise_compile_ac-selective-blocks24", impl="ft", precision="bf16", compile=True,
               ac="selective", ac_blocks=24, fp8="tensorwise"),
            _v("ft_fp8_tensorwise_compile_ac-selective-blocks20", impl="ft", precision="bf16", compile=True,
               ac="selective", ac_blocks=20, fp8="tensorwise"),
            # Measured in float8: 0.3 GiB per block left unchecked (64.4 GiB at 20 blocks).
            *[_v(f"ft_fp8_tensorwise_compile_ac-selective-blocks{n}", impl="ft", precision="bf16", compile=True,
                 ac="selective", ac_blocks=n, fp8="tensorwise") for n in (12, 8, 4)],
        ],
    },
    "c": {
        "arch": "llama3_2_1b", "seq_len": 2048, "max_num_tokens": 16384,
        "goal": "target tokens/s >= 3x the padded HF baseline at batch 32",
        "default": ["ft_bf16_compile_packed", "hf_bf16_eager_pad32", "hf_bf16_eager_pad16"],
        "variants": [
            _v("ft_bf16_compile_packed", impl="ft", precision="bf16", compile=True, rows="packed"),
            _v("hf_bf16_eager_pad32", impl="hf", precision="bf16", compile=False, rows="padded", hf_batch=32),
            _v("hf_bf16_eager_pad16", impl="hf", precision="bf16", compile=False, rows="padded", hf_batch=16),
            _v("ft_mixed_compile_packed", impl="ft", precision="mixed", compile=True, rows="packed"),
            _v("hf_mixed_eager_pad32", impl="hf", precision="mixed", compile=False, rows="padded", hf_batch=32),
            # ft's own padded mode (packing=False): what packing buys inside ft.
            _v("ft_bf16_compile_unpacked", impl="ft", precision="bf16", compile=True, rows="unpacked"),
            _v("hf_bf16_compile_pad32", impl="hf", precision="bf16", compile=True, rows="padded", hf_batch=32),
        ],
    },
    "qwen3_8b": {
        "arch": "qwen3_8b", "batch_size": 4, "seq_len": 2048,
        "goal": ">= 1.3x transformers' tokens/s, peak memory <= 70 GiB",
        "default": ["ft_bf16_compile_ac-selective", "hf_bf16_eager_gc", "ft_bf16_compile_ac-full", "hf_bf16_compile_gc"],
        "variants": [
            _v("ft_bf16_compile_ac-selective", impl="ft", precision="bf16", compile=True, ac="selective"),
            _v("hf_bf16_eager_gc", impl="hf", precision="bf16", compile=False, ac="full"),
            _v("ft_bf16_compile_ac-full", impl="ft", precision="bf16", compile=True, ac="full"),
            _v("hf_bf16_compile_gc", impl="hf", precision="bf16", compile=True, ac="full"),
            _v("ft_bf16_compile", impl="ft", precision="bf16", compile=True),
        ],
    },
}


def tiny_config(arch: str) -> Any:
    """A few-million-FLOP model with the arch's structure (GQA, tying, RoPE scaling)."""
    real = find_arch(arch)[1]
    # An explicit head_dim (Qwen3) shrinks too; elsewhere it follows dim / n_heads.
    explicit = {"head_dim": 16} if "head_dim" in {f.name for f in dataclasses.fields(real)} else {}
    return dataclasses.replace(real, vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160,
                               max_seq_len=16384, bos_id=1, eos_id=2, **explicit)


# ---------------------------------------------------------------------------------
# Data


def train_gsm8k_tokenizer(path: Path, out_dir: Path, *, vocab_size: int) -> Any:
    """A Llama-3-style byte-level BPE trained on the GSM8K file (see the module doc),
    saved as tokenizer.json and loaded through ft's own HF tokenizer class."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from ft.tokenizers import load_tokenizer

    # Llama 3's (tiktoken cl100k-style) split pattern: numbers in runs of at most 3 digits.
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    texts: list[str] = []
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                texts += [row["question"] + "\n", row["answer"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": specials[0], "eos_token": specials[1], "pad_token": specials[2]}))
    return load_tokenizer(out_dir / "tokenizer.json")


def length_stats(examples: list[Any]) -> dict[str, Any]:
    lengths = sorted(len(e) for e in examples)
    targets = sum(e.num_target_tokens for e in examples)
    return {
        "num_examples": len(lengths), "median_tokens": lengths[len(lengths) // 2],
        "p95_tokens": lengths[int(0.95 * (len(lengths) - 1))], "max_tokens": lengths[-1],
        "mean_tokens": sum(lengths) / len(lengths), "target_fraction": targets / sum(lengths),
    }


class HfPaddedBatches:
    """Shuffled batches of `batch_size` examples, right-padded to the batch's longest
    (a `DataCollatorForSeq2Seq`-style collator), cycling over epochs."""

    def __init__(self, examples: list[Any], *, batch_size: int, pad_id: int, seed: int) -> None:
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.epoch, self.order, self.pos = 0, self._order(0), 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(f"hf:{self.seed}:{epoch}").shuffle(order)
        return order

    def next(self) -> dict[str, Any]:
        if self.pos + self.batch_size > len(self.order):
            self.epoch += 1
            self.order, self.pos = self._order(self.epoch), 0
        chosen = [self.examples[i] for i in self.order[self.pos : self.pos + self.batch_size]]
        self.pos += self.batch_size
        T = max(len(e) for e in chosen)
        ids = torch.full((len(chosen), T), self.pad_id, dtype=torch.int64)
        labels = torch.full((len(chosen), T), -100, dtype=torch.int64)
        mask = torch.zeros((len(chosen), T), dtype=torch.int64)
        for r, e in enumerate(chosen):
            n = len(e)
            ids[r, :n] = torch.tensor(e.tokens)
            mask[r, :n] = 1
            # HF shifts inside the loss: label t is token t when it is a target.
            labels[r, :n] = torch.where(torch.tensor(e.target_mask), ids[r, :n], -100)
        if torch.cuda.is_available():
            ids, labels, mask = ids.pin_memory(), labels.pin_memory(), mask.pin_memory()
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "num_tokens": sum(len(e) for e in chosen), "num_targets": sum(e.num_target_tokens for e in chosen)}


# ---------------------------------------------------------------------------------
# Models and steps


def build_ft(config: Any, variant: Variant, gangs: Any, *, seed: int) -> torch.nn.Module:
    """As the recipe builds it: meta, parallelize (AC, per-block compile), materialize, init."""
    param_dtype = torch.float32 if variant.precision == "mixed" else torch.bfloat16
    model = create_model(
        config, device=gangs.device, dtype=param_dtype, seed=seed,
        parallelize=lambda model: parallelize_model(model, gangs, activation_checkpointing=variant.ac,
                                                    activation_checkpointing_blocks=variant.ac_blocks,
                                                    compile=variant.compile, fp8=variant.fp8),
    )
    model.train()
    return model


def build_hf(config: Any, variant: Variant, device: torch.device, *, seed: int) -> torch.nn.Module:
    import transformers

    values = family_of(config).hf_config(config)  # the family's own config.json: LlamaConfig, Qwen3Config, ...
    values.pop("torch_dtype", None)
    hf_config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    hf_config.use_cache = False
    dtype = torch.float32 if variant.precision == "mixed" else torch.bfloat16
    torch.manual_seed(seed)
    with torch.device(device):  # allocate and initialise on the GPU: an 8B init on CPU takes minutes
        try:
            model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=dtype)
        except TypeError:  # transformers 4.x
            model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa",
                                                                  torch_dtype=dtype)
    if variant.ac != "none":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # renamed in transformers 5.2x; same function
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


class HfTrainer:
    """The plain PyTorch loop an HF user writes: forward with labels, backward, clip, fused AdamW."""

    def __init__(self, model: torch.nn.Module, variant: Variant, device: torch.device, *, max_grad_norm: float = 1.0,
                 dynamic: bool | None = None) -> None:
        self.model = model
        self.device = device
        self.max_grad_norm = max_grad_norm
        self.forward = torch.compile(model, dynamic=dynamic) if variant.compile else model
        kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8,
                                           weight_decay=0.1, **kwargs)
        self.autocast = common.ft_autocast(device, variant.precision)

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        input_ids = input_ids.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device, non_blocking=True)
        with self.autocast:
            loss = self.forward(input_ids=input_ids, labels=labels, attention_mask=attention_mask).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def preflight(config: Any, variant: Variant, device: torch.device) -> str | None:
    """A reason to skip a variant: fp8 where it cannot run (no float8 GPU, no torchao),
    or weights, gradients and AdamW states that alone exceed the device."""
    if variant.fp8 != "none":
        from ft.errors import ConfigError
        from ft.models.fp8 import check_fp8_support

        try:
            check_fp8_support(variant.fp8, device)
        except ConfigError as error:
            return str(error)
    if device.type != "cuda":
        return None
    n = parameter_count(config)
    bytes_per_param = 16 if variant.precision == "mixed" else 8  # (w + g) fp32 + 2 fp32 moments; or all bf16
    need = n * bytes_per_param
    have = torch.cuda.get_device_properties(device).total_memory
    if need > 0.95 * have:
        return (f"does not fit one GPU: {n / 1e9:.2f}B parameters x {bytes_per_param} bytes (weights, gradients, "
                f"AdamW states) = {need / common.GiB:.0f} GiB > {have / common.GiB:.0f} GiB; "
                "use FSDP over several GPUs (benchmarks/fsdp_throughput.py)")
    return None


def make_step(workload: str, variant: Variant, config: Any, ctx: dict[str, Any], gangs: Any,
              args: argparse.Namespace) -> tuple[Callable[[], common.StepCounts], Any]:
    """The step closure of one variant (and the objects to free afterwards)."""
    device = gangs.device
    spec = ctx["spec"]
    seq_len = spec["seq_len"]
    if variant.impl == "ft":
        ft_loss.chunk_kernel = variant.loss_kernel  # variants run one after another in this process
        model = build_ft(config, variant, gangs, seed=args.seed)
        trainer = common.FtTrainer(model=model, gangs=gangs, autocast=common.ft_autocast(device, variant.precision),
                                   loss_chunk_size=variant.loss_chunk or args.loss_chunk_size,
                                   optimizer=variant.optimizer)
        if workload != "c":  # full rows of random tokens
            gen = torch.Generator().manual_seed(args.seed)
            batches = [common.random_full_rows(batch_size=spec["batch_size"], seq_len=seq_len,
                                               vocab_size=config.vocab_size, generator=gen,
                                               through_packed_path=variant.rows == "packed") for _ in range(3)]
            counter = iter(range(10**9))

            def next_batches() -> list[Any]:
                return [batches[next(counter) % len(batches)]]
        else:
            from ft.data import BatchReader

            def new_reader() -> BatchReader:
                return BatchReader(ctx["examples"], max_seq_len=seq_len, max_num_tokens=spec["max_num_tokens"],
                                   seed=args.seed, packing=variant.rows == "packed", pad_id=ctx["pad_id"])

            reader = new_reader()

            def next_batches() -> list[Any]:
                nonlocal reader
                batches = reader.next_step_batches()
                if batches is None:  # only with max_num_data_epochs; kept for safety
                    reader = new_reader()
                    batches = reader.next_step_batches()
                return batches

        def step() -> common.StepCounts:
            batches = next_batches()
            loss_sum = trainer.step(batches)
            targets = sum(b.num_target_tokens for b in batches)
            return common.StepCounts(
                tokens=sum(b.num_tokens for b in batches), targets=targets,
                computed=sum(b.tokens_BT.numel() for b in batches),
                flops=sum(b.tokens_BT.numel() * model_flops_per_token(config, b.tokens_BT.shape[1]) for b in batches),
                loss=loss_sum / max(targets, 1))

        return step, (model, trainer)

    model = build_hf(config, variant, device, seed=args.seed)
    trainer = HfTrainer(model, variant, device, dynamic=True if variant.rows == "padded" else None)
    if variant.rows == "full":
        gen = torch.Generator().manual_seed(args.seed)
        rows = [common.random_full_rows(batch_size=spec["batch_size"], seq_len=seq_len, vocab_size=config.vocab_size,
                                        generator=gen) for _ in range(3)]
        counter = iter(range(10**9))

        def step() -> common.StepCounts:
            b = rows[next(counter) % len(rows)]
            # HF shifts labels itself: pass the tokens as labels (same targets as ft's shifted labels).
            loss = trainer.step(b.tokens_BT, b.tokens_BT, None)
            return common.StepCounts(tokens=b.num_tokens, targets=b.num_target_tokens, computed=b.num_tokens,
                                     flops=b.num_tokens * model_flops_per_token(config, seq_len), loss=loss)
    else:
        source = HfPaddedBatches(ctx["examples"], batch_size=variant.hf_batch, pad_id=ctx["pad_id"], seed=args.seed)

        def step() -> common.StepCounts:
            b = source.next()
            loss = trainer.step(b["input_ids"], b["labels"], b["attention_mask"])
            B, T = b["input_ids"].shape
            return common.StepCounts(tokens=b["num_tokens"], targets=b["num_targets"], computed=B * T,
                                     flops=B * T * model_flops_per_token(config, T), loss=loss)

    return step, (model, trainer)


def run_variant(workload: str, variant: Variant, config: Any, ctx: dict[str, Any], gangs: Any,
                args: argparse.Namespace, warmup: int, steps: int) -> dict[str, Any]:
    device = gangs.device
    compile_ = variant.compile and device.type == "cuda"  # inductor on CPU needs minutes: smoke tests run eager
    variant = dataclasses.replace(variant, compile=compile_)
    result: dict[str, Any] = {
        "name": variant.name, "impl": variant.impl, "precision": variant.precision, "compile": compile_,
        "activation_checkpointing": variant.ac, "rows": variant.rows, "fp8": variant.fp8,
        "optimizer": variant.optimizer,
    }
    if variant.impl == "ft":
        result["loss_kernel"] = variant.loss_kernel
    if variant.loss_chunk is not None:
        result["loss_chunk_size"] = variant.loss_chunk
    if variant.ac_blocks is not None:
        result["activation_checkpointing_blocks"] = variant.ac_blocks
    if variant.impl == "hf" and variant.rows == "padded":
        result["batch_examples"] = variant.hf_batch
    elif workload == "c":
        result["max_num_tokens"] = ctx["spec"]["max_num_tokens"]
        result["seq_len"] = ctx["spec"]["seq_len"]
    else:
        result["batch_size"], result["seq_len"] = ctx["spec"]["batch_size"], ctx["spec"]["seq_len"]
    reason = preflight(config, variant, device)
    if reason:
        return {**result, "status": "skipped", "reason": reason}
    setup_start = time.perf_counter()
    common.reset_peak_memory(device)
    step, keep = make_step(workload, variant, config, ctx, gangs, args)
    try:
        timing = common.time_training(step, device=device, warmup=warmup, steps=steps, setup_start=setup_start)
        result.update(timing.summary(peak_tflops=ctx["peak_tflops"], spec_tflops=ctx["spec_tflops"]))
        result.update(common.peak_memory(device))
        reserved = result.get("peak_memory_reserved_gib")
        result["within_memory_limit"] = None if reserved is None else reserved <= args.max_memory_gib
        if args.profile_dir is not None:
            common.profile_steps(step, device=device, path=args.profile_dir / f"{workload}_{variant.name}.txt")
    finally:
        del step, keep
    return {**result, "status": "ok"}


def select_variants(workload: str, names: str) -> list[Variant]:
    table = {v.name: v for v in WORKLOADS[workload]["variants"]}
    if names == "default":
        wanted = WORKLOADS[workload]["default"]
    elif names == "all":
        wanted = list(table)
    else:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in table]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown} for workload {workload}; known: {', '.join(table)}")
    return [table[n] for n in wanted]


def add_ratios(writer: common.ResultWriter, workload: str) -> None:
    results = writer.doc["results"]
    key = "target_tokens_per_s" if workload == "c" else "tokens_per_s"
    ok = [r for r in results if r.get("status") == "ok"]
    ratios: dict[str, float] = {}
    for f in (r for r in ok if r["impl"] == "ft"):
        for h in (r for r in ok if r["impl"] == "hf" and r["precision"] == f["precision"]):
            value = common.ratio(results, f["name"], h["name"], key)
            if value is not None:
                ratios[f"{f['name']} / {h['name']}"] = value
        if workload == "b" and f["precision"] == "bf16":
            ratios[f"{f['name']} / torchtitan 10797"] = f["tokens_per_s"] / TORCHTITAN_8B_TOKENS_PER_S
        if f.get("fp8", "none") != "none":  # against ft's own bf16 variant of the same settings
            bf16 = f["name"].replace(f"fp8_{f['fp8']}", "bf16")
            value = common.ratio(results, f["name"], bf16, key)
            if value is not None:
                ratios[f"{f['name']} / {bf16}"] = value
    writer.set("ratio_key", key)
    writer.set("ratios", ratios)
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}x")


def _default_gsm8k() -> Path:
    """GSM8K's train.jsonl in a `shared/data` folder inside the checkout or beside it."""
    repo = Path(__file__).resolve().parents[1]
    candidates = [root / "shared" / "data" / "gsm8k" / "train.jsonl" for root in (repo, repo.parent)]
    return next((c for c in candidates if c.is_file()), candidates[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    parser.add_argument("--variants", default="default",
                        help="comma-separated variant names, 'default' or 'all' (see WORKLOADS in this file)")
    parser.add_argument("--gsm8k", type=Path, default=_default_gsm8k(),
                        help="GSM8K train.jsonl (question/answer rows) for workload c")
    parser.add_argument("--tokenizer-vocab", type=int, default=4500, help="BPE pieces of the GSM8K tokenizer")
    parser.add_argument("--max-num-tokens", type=int, default=None, help="workload c: ft tokens per micro-batch")
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    warmup, steps = common.resolve_steps(args)

    spec = dict(WORKLOADS[args.workload])
    config = tiny_config(spec["arch"]) if args.tiny else find_arch(spec["arch"])[1]
    if args.tiny:
        spec.update(batch_size=2, seq_len=64) if args.workload != "c" else spec.update(seq_len=256, max_num_tokens=512)
    if args.max_num_tokens is not None:
        spec["max_num_tokens"] = args.max_num_tokens
    variants = select_variants(args.workload, args.variants)
    if args.tiny:  # a CPU smoke test: the same code paths on a few hundred tokens per step
        real_layers = find_arch(spec["arch"])[1].n_layers  # the same share of the tiny model's blocks, rounded down
        variants = [dataclasses.replace(v, hf_batch=min(v.hf_batch, 4), ac_blocks=None if v.ac_blocks is None
                                        else v.ac_blocks * config.n_layers // real_layers) for v in variants]

    gangs = setup_gangs(device=args.device)
    device = gangs.device
    common.setup_torch(device)
    peak = common.measure_matmul_peak(device, tiny=args.tiny)
    ctx: dict[str, Any] = {"spec": spec, "peak_tflops": peak["tflops"], "spec_tflops": common.spec_peak_tflops(device)}
    header = {
        "benchmark": "train_throughput", "workload": args.workload, "arch": spec["arch"], "tiny": args.tiny,
        "goal": spec["goal"], "environment": common.environment(device), "matmul_peak": peak,
        "spec_peak_tflops": ctx["spec_tflops"], "warmup_steps": warmup, "timed_steps": steps,
        "model_config": dataclasses.asdict(config),
        "flops_per_token": model_flops_per_token(config, spec["seq_len"]),
        "loss_chunk_size": args.loss_chunk_size,
        "workload_spec": {k: v for k, v in spec.items() if k not in ("variants", "default")},
    }
    print(f"workload {args.workload} ({spec['arch']}{', tiny' if args.tiny else ''}) on "
          f"{header['environment']['device_name']}: matmul peak {peak['tflops']:.0f} TFLOP/s", flush=True)
    writer = common.ResultWriter(args.out, header)

    if args.workload == "c":
        from ft.data import read_examples

        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            tokenizer = train_gsm8k_tokenizer(args.gsm8k, Path(tmp), vocab_size=400 if args.tiny else args.tokenizer_vocab)
            examples = read_examples(args.gsm8k, tokenizer, format="gsm8k", max_seq_len=spec["seq_len"])
        ctx["examples"] = list(examples)
        ctx["pad_id"] = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        stats = length_stats(ctx["examples"])
        stats["tokenizer"] = (f"byte-level BPE, {tokenizer.vocab_size} pieces, Llama 3 split regex, trained on "
                              f"{args.gsm8k.name} in {time.perf_counter() - t0:.1f} s")
        writer.set("data", stats)
        print(f"GSM8K: {stats}", flush=True)

    try:
        for variant in variants:
            if writer.over_budget(args.budget_s):
                writer.add({"name": variant.name, "status": "skipped", "reason": f"budget of {args.budget_s:.0f} s spent"})
                continue
            try:
                result = run_variant(args.workload, variant, config, ctx, gangs, args, warmup, steps)
            except Exception as error:  # one variant's failure (OOM, compile error) must not lose the others
                result = common.error_result(variant.name, error)
            common.free_memory(device)
            writer.add(result)
        add_ratios(writer, args.workload)
    finally:
        teardown_gangs(gangs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
