"""Recipe configs: dataclass defaults, then `--config-file` files, then `--config k=v`.

A recipe declares its config as a dataclass (nested dataclasses are sections,
reached with dotted keys). Everything a user writes is checked against the
dataclass: an unknown key or a value of the wrong type is a `ConfigError` that
names the key and suggests the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from ft.errors import ConfigError

ConfigT = TypeVar("ConfigT")

# A config is a few hundred values; these bound what a hostile file can make ft do
# (a 1 KB YAML alias bomb expands to billions of values, a repr of it never ends).
MAX_CONFIG_FILE_BYTES = 1 << 20
MAX_CONFIG_VALUES = 10_000
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 4, 4, 4, 2


def short_repr(value: Any) -> str:
    """repr() bounded in length and depth, for echoing user values in messages."""
    return _SHORT.repr(value)


def build_config(
    config_class: type[ConfigT],
    *,
    config_files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
) -> ConfigT:
    """The effective config: defaults, each file left to right, then `key=value` overrides."""
    values = config_to_dict(config_class())
    for file in config_files:
        _merge(values, _read_config_file(Path(file)), config_class, prefix="", source=str(file))
    for override in overrides:
        key, value = parse_override(override)
        _merge(values, _nest(key, value), config_class, prefix="", source="--config")
    return dict_to_config(config_class, values)


def parse_override(override: str) -> tuple[str, Any]:
    """`a.b=VALUE` -> ("a.b", VALUE parsed as YAML)."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--config expects key=value, got {short_repr(override)}")
    return key, _load_yaml(text, f"--config {short_repr(key)}") if text.strip() else None


def _load_yaml(text: str, where: str) -> Any:
    """yaml.safe_load with the value count bounded; every failure a one-line ConfigError."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f":{mark.line + 1}" if mark and not where.startswith("--config") else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}{at}: invalid YAML ({short_repr(problem)[1:-1]})") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply for a config") from None
    _check_size(data, where)
    return data


def _check_size(data: Any, where: str) -> None:
    """Count values without expanding aliases past the bound (they share objects)."""
    budget = MAX_CONFIG_VALUES
    stack = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        budget -= 1
        if budget < 0 or depth > 100:
            raise ConfigError(
                f"{where}: the YAML expands to more than {MAX_CONFIG_VALUES} values or 100 levels "
                "(aliases that repeat each other?); a config holds far fewer"
            )
        if isinstance(value, Mapping):
            stack.extend((v, depth + 1) for v in value.values())
            stack.extend((k, depth + 1) for k in value.keys())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain YAML-able data (tuples become lists)."""
    return _to_plain(dataclasses.asdict(config))


def dict_to_config(config_class: type[ConfigT], values: Mapping[str, Any], *, prefix: str = "") -> ConfigT:
    """Build `config_class` from plain data, checking every key and type."""
    hints = typing.get_type_hints(config_class)
    names = {field.name for field in dataclasses.fields(config_class)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(prefix + key, names, prefix, source=None)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return config_class(**kwargs)


def dump_config(config: Any) -> str:
    """YAML that `--config-file` reads back to the same config."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=None)


def config_hash(config: Any, length: int = 10) -> str:
    """A stable hash of the whole config: any differing key gives a different hash."""
    canonical = json.dumps(config_to_dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"config file {path} {what}")
    try:
        if path.stat().st_size > MAX_CONFIG_FILE_BYTES:
            raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_FILE_BYTES >> 20} MiB; "
                              "a config file holds a few keys")
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {error.start}); "
                          "expected a YAML file of key: value lines") from None
    if "\0" in text:
        raise ConfigError(f"config file {path} holds NUL bytes; expected a YAML file of key: value lines")
    data = _load_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys, got {type(data).__name__}")
    return data


def _nest(dotted_key: str, value: Any) -> dict[str, Any]:
    parts = dotted_key.split(".")
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def _merge(target: dict[str, Any], update: Mapping[str, Any], config_class: type, *, prefix: str, source: str) -> None:
    """Merge `update` into `target` in place, rejecting keys `config_class` lacks."""
    fields = {field.name: field for field in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    for key, value in update.items():
        key = str(key)
        if key not in fields:
            raise _unknown_key(prefix + key, set(fields), prefix, source=source)
        section = _dataclass_in(hints[key])
        if section is not None and isinstance(value, Mapping):
            if not isinstance(target.get(key), dict):
                target[key] = config_to_dict(section())
            _merge(target[key], value, section, prefix=f"{prefix}{key}.", source=source)
        else:
            # Check the type now so the error names the source of the bad value.
            target[key] = _to_plain(_coerce(value, hints[key], prefix + key, source=source))


def _unknown_key(key: str, valid: set[str], prefix: str, *, source: str | None) -> ConfigError:
    leaf = key[len(prefix):]
    close = difflib.get_close_matches(leaf, sorted(valid), n=1, cutoff=0.3)
    alias = KEY_ALIASES.get(leaf)
    close = alias if alias in valid else close[0] if close else None
    hint = f"; did you mean '{prefix}{close}'?" if close else "; run with --dump-config to see the valid keys"
    origin = f" (in {source})" if source else ""
    return ConfigError(f"unknown config key {short_repr(key)}{origin}{hint}")


# Names users bring from other trainers, for the did-you-mean hint.
KEY_ALIASES = {
    "lr": "learning_rate", "steps": "max_num_steps", "max_steps": "max_num_steps", "epochs": "max_num_data_epochs",
    "batch_size": "max_num_tokens", "grad_accum": "gradient_accumulation",
    "gradient_accumulation_steps": "gradient_accumulation", "clip_grad_norm": "max_grad_norm",
    "skip_malformed": "skip_malformed_lines", "seq_len": "max_seq_len", "save_every_n_steps": "checkpoint_every_n_steps",
}


def _dataclass_in(annotation: Any) -> type | None:
    if dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(arg) for arg in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))


def _coerce(value: Any, annotation: Any, key: str, source: str | None = None) -> Any:
    """`value` as `annotation` wants it, or a ConfigError naming `key`."""
    try:
        return _coerce_or_raise(value, annotation, key)
    except _TypeMismatch:
        origin = f" (in {source})" if source else ""
        raise ConfigError(
            f"config key '{key}'{origin}: expected {_type_name(annotation)}, got {short_repr(value)}"
        ) from None


class _TypeMismatch(Exception):
    pass


def _coerce_or_raise(value: Any, annotation: Any, key: str) -> Any:
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        # Try the non-string types first so `x: int | str` keeps 3 an int.
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
            try:
                return _coerce_or_raise(value, arg, key)
            except (_TypeMismatch, ConfigError):
                continue
        raise _TypeMismatch
    if origin is Literal:
        if value in args:
            return value
        raise _TypeMismatch
    if annotation is type(None):
        if value is None:
            return None
        raise _TypeMismatch
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if isinstance(value, Mapping):
            return dict_to_config(annotation, value, prefix=key + ".")
        raise _TypeMismatch
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _TypeMismatch
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _TypeMismatch
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `5e-6` (no dot) as a string.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _TypeMismatch
    if annotation is str:
        # YAML reads `model=123` or `seed_name=1e-3` as numbers; a str key takes them as text.
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _TypeMismatch
    if origin in (list, Sequence) or annotation is list:
        if not isinstance(value, (list, tuple)):
            raise _TypeMismatch
        item_type = args[0] if args else Any
        return [_coerce_or_raise(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _TypeMismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce_or_raise(item, args[0], key) for item in value)
        if args and len(args) != len(value):
            raise _TypeMismatch
        return tuple(_coerce_or_raise(item, arg, key) for item, arg in zip(value, args or [Any] * len(value)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _TypeMismatch
        key_type, value_type = args or (Any, Any)
        return {
            _coerce_or_raise(k, key_type, key): _coerce_or_raise(v, value_type, f"{key}.{k}")
            for k, v in value.items()
        }
    if isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise _TypeMismatch


def _to_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    return value
