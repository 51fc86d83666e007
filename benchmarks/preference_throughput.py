"""DPO (precomputed reference) against SFT on one GPU, and the loss's peak memory
against a full-logits implementation, measured in the same run.

Three measurements on the same model (default: Llama-3.1-8B shape, random weights,
bf16 parameters, AdamW, selective activation checkpointing):

1. SFT: `ft.training.step.accumulate_gradients` + `next_token_loss` on packed rows of
   documents of `prompt_len + response_len` tokens (loss on the response), as
   `ft lm instruction_finetune` trains; tokens/s over non-padding tokens.
2. DPO: `ft.preference.step.accumulate_pair_gradients` + `preference_loss` with a
   reference table (as after the reference pass) on pairs of the same prompt and
   response lengths, packed the same way; tokens/s over chosen + rejected tokens.
3. Loss memory: for the hidden states of one micro-batch, the peak memory of the DPO
   loss forward + backward (from hidden states and the output projection) with
   ft's chunked log-probs against the plain implementation that builds the full
   `[tokens, vocab]` float32 log-softmax (TRL's `logits.log_softmax(-1).gather`).

Prints one JSON object (also written to --output). `--tiny` runs a debug-size
model on CPU in seconds (the smoke test).

    python benchmarks/preference_throughput.py --compile --output preference.json
    python benchmarks/preference_throughput.py --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))  # run from a checkout without `pip install -e .`

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ft.data import Example  # noqa: E402
from ft.data.reader import _Planner  # noqa: E402
from ft.gang import setup_gangs  # noqa: E402
from ft.models import create_model, model_flops_per_token  # noqa: E402
from ft.models.family import find_arch  # noqa: E402
from ft.models.parallelize import parallelize_model  # noqa: E402
from ft.preference.criteria import CriterionConfig, DpoConfig, pair_losses  # noqa: E402
from ft.preference.data import PairPlanner, PreferencePair  # noqa: E402
from ft.preference.logprobs import sequence_logprobs  # noqa: E402
from ft.preference.step import PreferenceStats, accumulate_pair_gradients, preference_loss  # noqa: E402
from ft.training.loss import target_positions  # noqa: E402
from ft.training.optim import build_optimizer, build_scheduler  # noqa: E402
from ft.training.step import accumulate_gradients, next_token_loss, optimizer_step  # noqa: E402
from ft.training.step_stats import StepStats  # noqa: E402

GiB = 2**30


def synthetic_pairs(n: int, *, prompt_len: int, response_len: int, vocab: int, seed: int) -> list[PreferencePair]:
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    return [PreferencePair(ids(prompt_len), ids(response_len), ids(response_len)) for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, *, device: torch.device, warmup: int, steps: int) -> tuple[float, float | None]:
    """(seconds for `steps` steps after `warmup`, peak GiB of the timed steps)."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None
    return elapsed, peak


def loss_memory(model, batch, device: torch.device, *, chunk_size: int, beta: float) -> dict[str, float]:
    """Peak memory (GiB above what was allocated before) and time of the DPO loss's forward +
    backward from fixed hidden states: chunked log-probs against full-vocabulary log-softmax."""
    with torch.no_grad():
        hidden = model(batch.tokens_BT.to(device), positions_BT=batch.positions_BT.to(device),
                       document_ids_BT=batch.document_ids_BT.to(device), return_hidden=True)
    index = target_positions(batch.labels_BT)
    sequences = batch.sequence_ids_BT.flatten().index_select(0, index).to(device)
    counts = torch.bincount(sequences.cpu(), minlength=2 * batch.num_pairs).float().to(device)
    labels = batch.labels_BT.to(device)
    index = index.to(device)
    reference = torch.randn(2 * batch.num_pairs, device=device) - 500
    criterion = CriterionConfig(name="dpo", dpo=DpoConfig(beta=beta))
    head = model.lm_head

    def chunked():
        return sequence_logprobs(h, head, labels, sequences, 2 * batch.num_pairs, chunk_size=chunk_size,
                                 target_index_N=index)

    def full_logits():
        logits = head(h).float()  # [B, T, V]: what the plain implementation builds
        logp = logits.log_softmax(-1)
        safe = labels.clamp(min=0)
        per_token = logp.gather(-1, safe[..., None]).squeeze(-1) * (labels != -100)
        seq = batch.sequence_ids_BT.to(device).clamp(min=0)
        return torch.zeros(2 * batch.num_pairs, device=device).index_add(0, seq.flatten(), per_token.flatten())

    out = {}
    for name, fn in (("chunked", chunked), ("full_logits", full_logits)):
        h = hidden.detach().requires_grad_(True)
        head.weight.grad = None
        sync(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        loss = pair_losses(criterion, fn(), counts, reference).loss.sum()
        loss.backward()
        sync(device)
        out[f"{name}_s"] = time.perf_counter() - start
        out[f"{name}_loss"] = float(loss.detach())
        if device.type == "cuda":
            out[f"{name}_peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / GiB
        del loss, h
    head.weight.grad = None
    if device.type == "cuda":
        out["memory_reduction"] = 1 - out["chunked_peak_gib"] / out["full_logits_peak_gib"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama3_1_8b")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--max-num-tokens", type=int, default=8192, help="tokens per micro-batch")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--activation-checkpointing", default="selective", choices=["none", "selective", "full"])
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (both recipes)")
    parser.add_argument("--tiny", action="store_true", help="debug-size model on CPU (smoke test)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.arch, args.max_seq_len, args.max_num_tokens = "llama_debug", 64, 256
        args.prompt_len, args.response_len, args.steps, args.warmup = 8, 16, 2, 1
    gangs = setup_gangs(device="cpu" if args.tiny else "auto", env={})
    device = gangs.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    _, config = find_arch(args.arch)
    torch.manual_seed(0)
    model = create_model(config, device=device, dtype=dtype, seed=0, initialize=True, parallelize=lambda m: parallelize_model(
        m, gangs, activation_checkpointing=args.activation_checkpointing, compile=args.compile))
    optimizer = build_optimizer(model, learning_rate=1e-6, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, schedule="constant", warmup_steps=0, max_num_steps=10**6,
                                final_lr_scale=1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    no_autocast = contextlib.nullcontext()

    # Enough pairs for every timed step; SFT trains on the chosen sequences of twice as many pairs.
    planner_pairs = synthetic_pairs(4096 if not args.tiny else 64, prompt_len=args.prompt_len,
                                    response_len=args.response_len, vocab=config.vocab_size, seed=1)
    pair_planner = PairPlanner(planner_pairs, max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens,
                               packing=True, pad_id=0)
    pair_batches = [pair_planner.collate(p) for p in pair_planner.plan(range(len(planner_pairs)))]
    examples = [Example(p.sequence(w), [False] * len(p.prompt) + [True] * args.response_len)
                for p in planner_pairs for w in (0, 1)]
    sft_planner = _Planner(examples, max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens,
                           packing=True, pad_id=0)
    sft_batches = [sft_planner.collate(r) for r in sft_planner.plan(range(len(examples)))]

    def make_step(batches, accumulate, loss_fn, stats):
        it = iter(batches)

        def step():
            accumulate(model, [next(it)], gangs=gangs, autocast=no_autocast, scaler=scaler, loss_fn=loss_fn,
                       stats=stats)
            optimizer_step(model, optimizer, scheduler, scaler, max_grad_norm=1.0)

        return step

    flops = model_flops_per_token(config, args.max_seq_len)
    result: dict = {"arch": args.arch, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "dtype": str(dtype), "max_seq_len": args.max_seq_len, "max_num_tokens": args.max_num_tokens,
                    "prompt_len": args.prompt_len, "response_len": args.response_len, "steps": args.steps,
                    "activation_checkpointing": args.activation_checkpointing, "compile": args.compile, "torch": torch.__version__}
    n = args.warmup + args.steps
    sft_s, sft_peak = time_steps(make_step(sft_batches, accumulate_gradients, next_token_loss(args.chunk_size),
                                           StepStats.zero(device)), device=device, warmup=args.warmup,
                                 steps=args.steps)
    sft_tokens = sum(b.num_tokens for b in sft_batches[args.warmup:n])
    reference = torch.randn(len(planner_pairs), 2) - 500
    dpo_loss = preference_loss(CriterionConfig(name="dpo"), chunk_size=args.chunk_size, reference_P2=reference)
    dpo_s, dpo_peak = time_steps(make_step(pair_batches, accumulate_pair_gradients, dpo_loss,
                                           PreferenceStats.zero(device)), device=device, warmup=args.warmup,
                                 steps=args.steps)
    dpo_tokens = sum(b.num_tokens for b in pair_batches[args.warmup:n])
    result["sft"] = {"tokens_per_s": sft_tokens / sft_s, "step_s": sft_s / args.steps, "peak_memory_gib": sft_peak,
                     "mfu_tflops": sft_tokens * flops / sft_s / 1e12}
    result["dpo"] = {"tokens_per_s": dpo_tokens / dpo_s, "step_s": dpo_s / args.steps, "peak_memory_gib": dpo_peak,
                     "pairs_per_step": pair_batches[0].num_pairs, "mfu_tflops": dpo_tokens * flops / dpo_s / 1e12}
    result["dpo_over_sft_tokens_per_s"] = result["dpo"]["tokens_per_s"] / result["sft"]["tokens_per_s"]
    optimizer.zero_grad(set_to_none=True)
    result["loss_memory"] = loss_memory(model, pair_batches[0], device, chunk_size=args.chunk_size, beta=0.1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
