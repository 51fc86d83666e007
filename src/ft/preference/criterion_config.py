"""The `criterion` section of `ft lm preference_finetune`: which preference loss, and
each loss's settings (key names as in fairseq2 0.4). The losses themselves are in
`ft.preference.criteria`; this module imports no torch, so the recipe's config and
its `--help` do not either."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
        CRITERION_SECTIONS.get(self.name, key="criterion.name")
        for section in CRITERION_SECTIONS.names():
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


# The criteria by name, each with its config section (the losses, which import torch,
# register under the same names in `ft.preference.criteria.CRITERIA`).
CRITERION_SECTIONS: Registry[type] = Registry("preference criterion")
for _name, _section in (("dpo", DpoConfig), ("simpo", SimpoConfig), ("orpo", OrpoConfig), ("cpo", CpoConfig)):
    CRITERION_SECTIONS.register(_name, _section)

__all__ = ["CRITERION_SECTIONS", "CpoConfig", "CriterionConfig", "DpoConfig", "OrpoConfig", "SimpoConfig"]
