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

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ft.errors import ConfigError
from ft.registry import Registry


@dataclass(kw_only=True)
class DpoConfig:
    beta: float = 0.1
    """Strength of the pull towards the reference model."""
    label_smoothing: float = 0.0
    """Probability that a pair's label is flipped (conservative DPO); 0: plain DPO."""
    reference_free: bool = False
    """Compare with a uniform reference (c0 = r0 = 0): no reference pass."""
    length_normalization: bool = False
    """Use per-token mean log-probabilities as the implicit reward."""
    nll_scale: float = 0.0
    """Weight of the chosen responses' NLL added to the loss."""


@dataclass(kw_only=True)
class SimpoConfig:
    beta: float = 2.0
    gamma: float = 1.0
    """Target reward margin."""
    length_normalization: bool = True
    nll_scale: float = 0.0


@dataclass(kw_only=True)
class OrpoConfig:
    orpo_lambda: float = 0.1
    """Weight of the odds-ratio term."""
    nll_scale: float = 1.0
    """Weight of the chosen responses' NLL (the SFT term)."""


@dataclass(kw_only=True)
class CpoConfig:
    beta: float = 0.1
    nll_scale: float = 1.0
    """Weight of the chosen responses' NLL (the behaviour-cloning term)."""


@dataclass(kw_only=True)
class CriterionConfig:
    name: str = "dpo"
    """The loss: dpo, simpo, orpo or cpo (`ft.preference.criteria.CRITERIA`); its section below sets it."""
    dpo: DpoConfig = field(default_factory=DpoConfig)
    simpo: SimpoConfig = field(default_factory=SimpoConfig)
    orpo: OrpoConfig = field(default_factory=OrpoConfig)
    cpo: CpoConfig = field(default_factory=CpoConfig)

    def __post_init__(self) -> None:
        CRITERIA.get(self.name, key="criterion.name")
        for section in ("dpo", "simpo", "orpo", "cpo"):
            for key, value in vars(getattr(self, section)).items():
                if isinstance(value, float) and (not math.isfinite(value) or value < 0):
                    raise ConfigError(f"config key 'criterion.{section}.{key}' must be a finite number >= 0, "
                                      f"got {value!r}")
        if not self.dpo.label_smoothing < 0.5:
            raise ConfigError(f"config key 'criterion.dpo.label_smoothing' must be in [0, 0.5), "
                              f"got {self.dpo.label_smoothing!r}")

    @property
    def section(self):
        return getattr(self, self.name)

    @property
    def needs_reference(self) -> bool:
        return self.name == "dpo" and not self.dpo.reference_free


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
