"""Beam search over a `StaticKVCache`: `beam_size` rows per prompt, reordered in
place after every step with `cache.reorder`.

Semantics follow fairseq's sequence generator: at each step the 2K best
continuations of a prompt's K beams are ranked; a continuation that ends in a stop
token and ranks within the top K becomes a finished hypothesis, the best K others
continue. A prompt is done once it has K finished hypotheses (or reaches
`max_gen_len`, where the running beams are finished as they are). Hypotheses are
ranked by `sum of log-probs / length ** length_penalty`, length counting the
generated tokens (stop token included). With K = 1 this is greedy decoding.

Bookkeeping is per step on the host (a few dozen candidates), which costs one
synchronisation per step; the model forward dominates for any real model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ft.generation.cache import StaticKVCache


@dataclass
class Hypothesis:
    tokens: list[int]
    logprobs: list[float]
    score: float  # length-normalized
    finish_reason: str  # "stop" or "length"


@dataclass
class _Beam:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


def beam_search(
    step: Callable[[Tensor, Tensor], Tensor],
    cache: StaticKVCache,
    first_logits_RV: Tensor,
    positions_R1: Tensor,
    *,
    num_prompts: int,
    beam_size: int,
    max_gen_len: int,
    stop_ids: set[int],
    length_penalty: float,
    on_step: Callable[[int], None] | None = None,
) -> list[Hypothesis]:
    """The best hypothesis of each of `num_prompts` prompts.

    Rows are laid out prompt-major (row = p * K + k), every prompt's K rows holding
    the same prefilled prompt; `first_logits_RV` are the prefill logits of the last
    prompt position and `positions_R1` the position of the first generated token.
    Rows of prompts beyond `num_prompts` (batch padding) are ignored.
    """
    K = beam_size
    R, V = first_logits_RV.shape
    P = R // K
    device = first_logits_RV.device

    beams = [_Beam() for _ in range(R)]
    beam_scores_PK = torch.full((P, K), float("-inf"), device=device)
    beam_scores_PK[:, 0] = 0.0  # the K rows are identical at first: expand only one of them
    finished: list[list[Hypothesis]] = [[] for _ in range(P)]
    done = [p >= num_prompts for p in range(P)]
    logits_RV = first_logits_RV
    positions_R1 = positions_R1.clone()
    num_candidates = min(2 * K, K * V)

    for t in range(max_gen_len):
        lp_RV = torch.log_softmax(logits_RV.float(), dim=-1)
        cand_PKV = beam_scores_PK[:, :, None] + lp_RV.view(P, K, V)
        top_scores_PC, top_index_PC = cand_PKV.view(P, K * V).topk(num_candidates, dim=-1)
        token_lp_PC = lp_RV.view(P, K * V).gather(1, top_index_PC)
        scores, indices, token_lps = top_scores_PC.tolist(), top_index_PC.tolist(), token_lp_PC.tolist()

        length = t + 1
        last_step = length == max_gen_len
        reorder_R = list(range(R))
        next_tokens_R = [0] * R
        new_scores_PK = [[float("-inf")] * K for _ in range(P)]
        for p in range(P):
            if done[p]:
                continue
            continuing: list[tuple[float, int, int, float]] = []
            for rank, (score, index, token_lp) in enumerate(zip(scores[p], indices[p], token_lps[p])):
                if score == float("-inf"):
                    break
                row, token = p * K + index // V, index % V
                if token in stop_ids:
                    if rank < K:
                        beam = beams[row]
                        finished[p].append(
                            Hypothesis(beam.tokens + [token], beam.logprobs + [token_lp], score / length**length_penalty, "stop")
                        )
                elif len(continuing) < K:
                    continuing.append((score, row, token, token_lp))
            if last_step:
                for score, row, token, token_lp in continuing:
                    beam = beams[row]
                    finished[p].append(
                        Hypothesis(beam.tokens + [token], beam.logprobs + [token_lp], score / length**length_penalty, "length")
                    )
            if len(finished[p]) >= K or last_step or not continuing:
                done[p] = True
                continue
            for k, (score, row, token, _) in enumerate(continuing):
                reorder_R[p * K + k] = row
                next_tokens_R[p * K + k] = token
                new_scores_PK[p][k] = score
            new_beams = [_Beam(beams[row].tokens + [token], beams[row].logprobs + [token_lp]) for _, row, token, token_lp in continuing]
            for k, beam in enumerate(new_beams):
                beams[p * K + k] = beam
        if on_step is not None:
            on_step(sum(1 for p in range(min(P, num_prompts)) if not done[p]) * K)
        if all(done):
            break
        cache.reorder(torch.tensor(reorder_R, device=device))
        beam_scores_PK = torch.tensor(new_scores_PK, device=device)
        tokens_R1 = torch.tensor(next_tokens_R, device=device)[:, None]
        logits_RV = step(tokens_R1, positions_R1)
        positions_R1 += 1

    best = []
    for p in range(num_prompts):
        best.append(max(finished[p], key=lambda h: h.score))
    return best
