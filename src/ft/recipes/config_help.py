"""What a recipe's config keys mean and where their values came from.

`field_docs` reads a config dataclass's source (its attribute docstrings and
section classes) without importing anything new, for `--help` and
`--dump-config --explain`. `value_origins` says, per dotted key, which layer set
it: default, preset, a config file, or the command line.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml


@dataclass(frozen=True)
class FieldDoc:
    key: str  # dotted for keys inside a section
    type: str
    default: str
    description: str


def field_docs(config_class: type, prefix: str = "") -> list[FieldDoc]:
    """Every key of `config_class` (sections expanded) with its type, default and description."""
    descriptions = _attribute_docstrings(config_class)
    hints = typing.get_type_hints(config_class)
    docs = []
    for f in dataclasses.fields(config_class):
        section = hints[f.name] if dataclasses.is_dataclass(hints[f.name]) else None
        if section is not None:
            docs += field_docs(section, prefix=f"{prefix}{f.name}.")
            continue
        docs.append(FieldDoc(f"{prefix}{f.name}", _type_text(hints[f.name]), _value_text(_default(f)),
                             descriptions.get(f.name, "")))
    return docs


def _default(f: dataclasses.Field) -> Any:
    # Read from the field, not from an instance: `__post_init__` checks names against
    # registries that import torch, and `--help` must not.
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def format_keys_help(config_class: type) -> str:
    """The `--help` epilog: one line per key, `key = default  description`."""
    docs = field_docs(config_class)
    width = min(max(len(f"{d.key} = {d.default}") for d in docs), 44)
    lines = ["config keys (set with --config key=value, or in a --config-file):"]
    for d in docs:
        head = f"{d.key} = {d.default}"
        summary = d.description.split(". ")[0].rstrip(".") if d.description else d.type
        lines.append(f"  {head:<{width}}  {summary}" if len(head) <= width else f"  {head}\n  {'':<{width}}  {summary}")
    return "\n".join(lines)


def value_origins(
    defaults: Mapping[str, Any], *, preset: tuple[str, Mapping[str, Any]] | None,
    config_files: Sequence[tuple[str, Mapping[str, Any]]], overrides: Sequence[tuple[str, Any]],
) -> dict[str, str]:
    """{dotted key: "preset NAME" | "FILE" | "command line"} for every key a layer set."""
    origins: dict[str, str] = {}
    layers = ([(f"preset {preset[0]}", preset[1])] if preset else []) + list(config_files)
    for source, values in layers:
        for key in _leaf_keys(values, defaults):
            origins[key] = source
    for key, _ in overrides:
        origins[key] = "command line"
    return origins


def annotated_dump(config: Any, origins: Mapping[str, str], *, explain: bool) -> str:
    """The config as YAML (readable back by --config-file), each value followed by a
    comment saying where it came from, and with `explain` a description line above it."""
    docs = {d.key: d for d in field_docs(type(config))}
    from ft.config import config_to_dict

    plain = config_to_dict(config)
    lines: list[str] = []

    def emit(values: Mapping[str, Any], prefix: str, indent: str) -> None:
        for key, value in values.items():
            dotted = prefix + key
            if isinstance(value, dict) and dotted not in docs:
                lines.append(f"{indent}{key}:")
                emit(value, dotted + ".", indent + "  ")
                continue
            doc = docs.get(dotted)
            if explain and doc is not None and doc.description:
                lines.append(f"{indent}# {' '.join(doc.description.split())}")
            lines.append(f"{indent}{key}: {_flow(value)}  # {origins.get(dotted, 'default')}")

    emit(plain, "", "")
    return "\n".join(lines) + "\n"


def _leaf_keys(values: Mapping[str, Any], defaults: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        key = str(key)
        if isinstance(value, Mapping) and isinstance(defaults.get(key), Mapping):
            keys += _leaf_keys(value, defaults[key], prefix=f"{prefix}{key}.")
        else:
            keys.append(prefix + key)
    return keys


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """{field: the string literal that follows its declaration} from the sources of the class
    and its bases (a subclass's declaration wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is not object:
            docs.update(_own_attribute_docstrings(klass))
    return docs


def _own_attribute_docstrings(cls: type) -> dict[str, str]:
    try:
        source = Path(inspect.getsourcefile(cls) or "").read_text()
    except (OSError, TypeError):
        return {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            docs = {}
            body = node.body
            for stmt, following in zip(body, body[1:]):
                if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                        and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                        and isinstance(following.value.value, str)):
                    docs[stmt.target.id] = " ".join(following.value.value.split())
            return docs
    return {}


def _type_text(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if typing.get_origin(annotation) is None else None
    return text or str(annotation).replace("typing.", "")


def _value_text(value: Any) -> str:
    return _flow(list(value) if isinstance(value, tuple) else value)


def _flow(value: Any) -> str:
    """`value` as one line of YAML (flow style), as it reads back."""
    text = yaml.safe_dump([value], default_flow_style=True, width=10_000).strip()
    return text[1:-1]


__all__ = ["FieldDoc", "annotated_dump", "field_docs", "format_keys_help", "value_origins"]
