"""Presets: named starting configs per recipe, shipped as YAML in the package.

`presets/<recipe>/<name>.yaml` holds config keys; its first comment line is the
one-line description `--list-presets` shows. A preset sits between the
dataclass defaults and `--config-file` / `--config` (see `ft.config.build_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ft.errors import ConfigError

PRESET_DIR = Path(__file__).parent


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    file: Path

    def values(self) -> dict[str, Any]:
        data = yaml.safe_load(self.file.read_text())
        if not isinstance(data, dict):
            raise ConfigError(f"preset {self.name} ({self.file}) must hold a mapping of config keys")
        return data


def list_presets(recipe: str) -> list[Preset]:
    directory = PRESET_DIR / recipe
    if not directory.is_dir():
        return []
    return [Preset(file.stem, _description(file), file) for file in sorted(directory.glob("*.yaml"))]


def get_preset(recipe: str, name: str) -> Preset:
    presets = {preset.name: preset for preset in list_presets(recipe)}
    if name not in presets:
        import difflib

        close = difflib.get_close_matches(name, list(presets), n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown preset '{name}' for {recipe}; {hint}known: {', '.join(presets) or 'none'} "
                          f"(--list-presets describes them)")
    return presets[name]


def format_preset_list(recipe: str) -> str:
    presets = list_presets(recipe)
    if not presets:
        return f"{recipe} has no presets\n"
    width = max(len(p.name) for p in presets)
    lines = [f"  {p.name:<{width}}  {p.description}" for p in presets]
    return (f"presets of {recipe} (--preset NAME; with none, the defaults train the embedded tiny model on a CPU):\n"
            + "\n".join(lines) + "\n")


def _description(file: Path) -> str:
    for line in file.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


__all__ = ["Preset", "format_preset_list", "get_preset", "list_presets"]
