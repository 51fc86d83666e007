"""`GeneratorConfig`: how `generate` decodes, the `generator_config` section of `ft lm
generate`. Apart from the generator so that the recipe's config (and its `--help`)
imports without torch."""

from __future__ import annotations

from dataclasses import dataclass

from ft.errors import ConfigError


@dataclass(kw_only=True)
class GeneratorConfig:
    """How `generate` decodes (the `generator_config.*` keys of `ft lm generate`)."""

    max_gen_len: int = 256
    """Most tokens generated per prompt (the stop token included)."""
    temperature: float = 0.6
    """Sampling temperature; 0 means greedy."""
    top_p: float = 0.9
    """Nucleus sampling: keep the most likely tokens up to this much probability (1.0: off)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: off)."""
    greedy: bool = False
    """Always take the most likely token (ignores temperature, top_p, top_k)."""
    beam_size: int = 1
    """Beam search with this many beams when > 1 (deterministic; sampling keys unused)."""
    length_penalty: float = 1.0
    """Beam search ranks hypotheses by sum of log-probs / length ** length_penalty."""
    batch_size: int = 16
    """Prompts decoded together (beam search holds batch_size * beam_size rows)."""
    seed: int = 2
    """Seed of the sampling generator."""
    echo_prompt: bool = False
    """Prefix each response text with its prompt text."""
    cuda_graphs: bool = True
    """On CUDA, replay the decode step from a captured CUDA graph."""
    compile: bool = False
    """torch.compile the decode step (slow to start; pays off on long runs)."""

    def validate(self) -> None:
        checks = [
            ("max_gen_len", self.max_gen_len >= 1, "at least 1"),
            ("temperature", self.temperature >= 0, ">= 0 (0 means greedy)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("top_k", self.top_k >= 0, ">= 0 (0 turns it off)"),
            ("beam_size", self.beam_size >= 1, "at least 1"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise ConfigError(f"config key 'generator_config.{key}' must be {expected}, got {getattr(self, key)!r}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


__all__ = ["GeneratorConfig"]
