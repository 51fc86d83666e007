"""The preference losses, per pair, from per-sequence log-probabilities.

Notation: `c`, `r` are log pi(y_w | x) and log pi(y_l | x), sums over the response
tokens; `|c|`, `|r|` the response lengths; `c0`, `r0` the reference model's; `nll`
the chosen response's mean negative log-likelihood per token, `-c / |c|` (the
SFT term of ORPO and CPO; `nll_scale` weighs it, as fairseq2 0.4 did).

- DPO (Rafailov et al. 2023): `z = beta * ((c - c0) - (r - r0))`,
  `loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)` (eps: `label_smoothing`,
  conservative DPO); `reference_free` sets c0 = r0 = 0; `length_normalization` uses
  per-token means of c, r, c0, r0. Rewards `beta (c - c0)`, `beta (r - r0)`.
- SimPO (Meng et al. 2024): `loss = -log sigmoid(beta c/|c| - beta r/|r| - gamma)`
  (sums without `length_normalization`). Rewards `beta c/|c|`, `beta r/|r|`.
- ORPO (Hong et al. 2024): with mean log-probs `a = c/|c|`, `b = r/|r|`,
  `log_odds = (a - b) - (log(1 - e^a) - log(1 - e^b))`,
  `loss = nll_scale * nll - orpo_lambda * log sigmoid(log_odds)`. Rewards `orpo_lambda a`, `orpo_lambda b`.
- CPO (Xu et al. 2024): `loss = -log sigmoid(beta (c - r)) + nll_scale * nll`. Rewards `beta c`, `beta r`.

Each returns per-pair tensors; the step sums them and divides by the pairs of the
whole optimizer step.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ft.preference.criterion_config import (  # noqa: F401  (re-exported)
    CpoConfig, CriterionConfig, DpoConfig, OrpoConfig, SimpoConfig,
)
from ft.registry import Registry


class PairLosses(NamedTuple):
    """Per-pair `[P]` float32 tensors."""

    loss: torch.Tensor
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor


# (section config, policy [P, 2], lengths [P, 2], reference [P, 2] or None) -> PairLosses;
# column 0 is the chosen, column 1 the rejected response.
Criterion = Callable[[object, torch.Tensor, torch.Tensor, "torch.Tensor | None"], PairLosses]


def pair_losses(config: CriterionConfig, policy_S: torch.Tensor, counts_S: torch.Tensor,
                reference_S: torch.Tensor | None) -> PairLosses:
    """The losses of the pairs of a batch from interleaved per-sequence sums
    (`[c0, r0, c1, r1, ...]`, as `batch_sequence_logprobs` returns them)."""
    reference = reference_S.view(-1, 2) if reference_S is not None else None
    return CRITERIA.get(config.name)(config.section, policy_S.view(-1, 2), counts_S.view(-1, 2), reference)


def chosen_nll(policy_P2: torch.Tensor, lengths_P2: torch.Tensor) -> torch.Tensor:
    return -policy_P2[:, 0] / lengths_P2[:, 0].clamp(min=1)


def _mean(logp_P2: torch.Tensor, lengths_P2: torch.Tensor) -> torch.Tensor:
    return logp_P2 / lengths_P2.clamp(min=1)


def _dpo(config: DpoConfig, policy: torch.Tensor, lengths: torch.Tensor, reference: torch.Tensor | None) -> PairLosses:
    if reference is None:
        if not config.reference_free:
            raise ValueError("DPO needs reference log-probabilities unless reference_free")
        reference = torch.zeros_like(policy)
    nll = chosen_nll(policy, lengths)
    if config.length_normalization:
        policy, reference = _mean(policy, lengths), _mean(reference, lengths)
    rewards = config.beta * (policy - reference)
    z = rewards[:, 0] - rewards[:, 1]
    eps = config.label_smoothing
    loss = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    return PairLosses(loss + config.nll_scale * nll, rewards[:, 0], rewards[:, 1])


def _simpo(config: SimpoConfig, policy: torch.Tensor, lengths: torch.Tensor, reference) -> PairLosses:
    rewards = config.beta * (_mean(policy, lengths) if config.length_normalization else policy)
    loss = -F.logsigmoid(rewards[:, 0] - rewards[:, 1] - config.gamma)
    return PairLosses(loss + config.nll_scale * chosen_nll(policy, lengths), rewards[:, 0], rewards[:, 1])


def _orpo(config: OrpoConfig, policy: torch.Tensor, lengths: torch.Tensor, reference) -> PairLosses:
    mean = _mean(policy, lengths)
    # log(p / (1 - p)) with p the per-token mean probability; log1p(-exp(x)) is log(1 - e^x)
    log_odds = (mean[:, 0] - mean[:, 1]) - (torch.log1p(-torch.exp(mean[:, 0])) - torch.log1p(-torch.exp(mean[:, 1])))
    loss = config.nll_scale * chosen_nll(policy, lengths) - config.orpo_lambda * F.logsigmoid(log_odds)
    return PairLosses(loss, config.orpo_lambda * mean[:, 0], config.orpo_lambda * mean[:, 1])


def _cpo(config: CpoConfig, policy: torch.Tensor, lengths: torch.Tensor, reference) -> PairLosses:
    rewards = config.beta * policy
    loss = -F.logsigmoid(rewards[:, 0] - rewards[:, 1]) + config.nll_scale * chosen_nll(policy, lengths)
    return PairLosses(loss, rewards[:, 0], rewards[:, 1])


def register_criteria(criteria: Registry[Criterion]) -> None:
    criteria.register("dpo", _dpo)
    criteria.register("simpo", _simpo)
    criteria.register("orpo", _orpo)
    criteria.register("cpo", _cpo)


CRITERIA: Registry[Criterion] = Registry("preference criterion")
register_criteria(CRITERIA)
