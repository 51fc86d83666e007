"""Asset cards: finding them on disk and merging `base` chains and `@user` overlays.

A card is one YAML document with a `name`. Files hold several documents. The
search order is the user directory, then the system directories; the first
directory that defines a name wins. `base: y` makes a card inherit every field
of `y` it does not set itself (family cards such as `llama3` hold the fields
every model of a family shares). A card `x@user` overlays card `x` where `x` sits
in any card's base chain, so `llama3@user` reaches every model card with
`base: llama3` that does not set the field itself (as in fairseq2, model
cards leave family-wide fields such as `tokenizer` to the family card). An
overlay whose card does not exist is an error when named and a warning
otherwise (`ft assets list` shows it).
Paths in a card are relative to the file that holds it.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from ft.config import short_repr
from ft.errors import AssetError

log = logging.getLogger("ft")
_WARNED_ORPHANS: set[str] = set()

PACKAGED_CARD_DIR = Path(__file__).parent / "cards"

# The fields a card may have and the types they must have; any other field is an
# error naming the closest of these (a typo such as `chekpoint:` would otherwise be
# silently ignored).
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "base": (str,),
    "model_family": (str,),
    "model_arch": (str,),
    "model_config": (dict,),
    "checkpoint": (str,),
    "tokenizer": (str,),
    "tokenizer_family": (str,),
    "dataset_family": (str,),
    "data": (str,),
    "use_eot": (bool,),
}

# Fields that hold paths, resolved against the directory of the card's file.
PATH_FIELDS = ("checkpoint", "tokenizer", "data")

USER_SUFFIX = "@user"


@dataclass(frozen=True)
class RawCard:
    """One YAML document as written, with where it came from."""

    name: str
    fields: dict[str, Any]
    file: Path

    @property
    def where(self) -> str:
        return f"card '{self.name}' in {self.file}"


@dataclass(frozen=True)
class AssetCard:
    """A card with its `base` chain and `@user` overlay merged in."""

    name: str
    fields: dict[str, Any]
    sources: tuple[RawCard, ...] = field(default=())

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.fields:
            raise AssetError(f"{self._where()} has no '{key}' field")
        return self.fields[key]

    def path(self, key: str) -> Path:
        """A path field, resolved and checked to exist."""
        value = self.require(key)
        if "://" in value:
            local = _resolve_hub_uri(value)
            if local is None and key == "tokenizer":
                local = self._tokenizer_beside_checkpoint(value)
            if local is not None:
                return local
            raise AssetError(
                f"{self._where()}: {key} '{value}' is not on this machine (ft does not download from "
                f"the hub). Download it, then overlay the card: add a card named '{self.name}{USER_SUFFIX}' "
                f"with '{key}: /local/path' to {user_asset_dir()}"
            )
        path = Path(value).expanduser()
        if not path.exists():
            raise AssetError(
                f"{self._where()}: {key} {path} does not exist; fix the path or overlay the card with "
                f"'{self.name}{USER_SUFFIX}' in {user_asset_dir()}"
            )
        return path

    def _tokenizer_beside_checkpoint(self, uri: str) -> Path | None:
        """The file a family card's hub tokenizer names, found in the model's own local
        checkpoint instead (every Llama 3 repo ships the same `original/tokenizer.model`)."""
        checkpoint = self.get("checkpoint")
        if not checkpoint:
            return None
        local = _resolve_hub_uri(checkpoint) if "://" in checkpoint else Path(checkpoint).expanduser()
        if local is None or not local.exists():
            return None
        sub = Path(*uri.partition("://")[2].split("/")[2:])
        directory = local if local.is_dir() else local.parent
        for candidate in (directory / sub, directory / sub.name, directory.parent / sub):
            if candidate.is_file():
                return candidate
        return None

    def _where(self) -> str:
        # A card and its base often share one file: name each file once.
        files = ", ".join(dict.fromkeys(str(source.file) for source in self.sources)) or "?"
        return f"card '{self.name}' ({files})"


def user_asset_dir() -> Path:
    if os.environ.get("FT_USER_ASSET_DIR"):
        return Path(os.environ["FT_USER_ASSET_DIR"]).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home).expanduser() / "ft" / "assets"


def system_asset_dirs() -> list[Path]:
    dirs = [Path(p).expanduser() for p in os.environ.get("FT_ASSET_DIR", "").split(os.pathsep) if p]
    return dirs + [PACKAGED_CARD_DIR]


def asset_dirs() -> list[Path]:
    """Directories in search order: user first, then system."""
    return [user_asset_dir(), *system_asset_dirs()]


class AssetStore:
    """Every card found in `dirs`, indexed by name (first directory wins)."""

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = dirs
        self._cards: dict[str, RawCard] = {}
        for directory in dirs:
            for name, raw in _read_dir(directory).items():
                self._cards.setdefault(name, raw)

    @classmethod
    def default(cls) -> AssetStore:
        store = cls(asset_dirs())
        for raw in store.orphan_overlays():
            if raw.name not in _WARNED_ORPHANS:  # once per process, not per lookup
                _WARNED_ORPHANS.add(raw.name)
                log.warning("%s", store.orphan_message(raw))
        return store

    def names(self) -> list[str]:
        return sorted(name for name in self._cards if not name.endswith(USER_SUFFIX))

    def __contains__(self, name: object) -> bool:
        return name in self._cards

    def missing_message(self, name: str) -> str:
        """What to say when no card is named `name`: the closest names, else how to list them."""
        return f"no asset card named '{name}'{_suggest(name, self.names())}"

    def load(self, name: str) -> AssetCard:
        """The merged card `name`; `x@user` names card `x` with its overlay."""
        if name.endswith(USER_SUFFIX) and name in self._cards:
            base = name[: -len(USER_SUFFIX)]
            if base not in self._cards:
                raise AssetError(self.orphan_message(self._cards[name]))
            name = base
        return self._load(name, chain=())

    def orphan_overlays(self) -> list[RawCard]:
        """Overlays `x@user` with no card `x`: almost always a typo in the name."""
        return [raw for name, raw in sorted(self._cards.items())
                if name.endswith(USER_SUFFIX) and name[: -len(USER_SUFFIX)] not in self._cards]

    def orphan_message(self, raw: RawCard) -> str:
        base = raw.name[: -len(USER_SUFFIX)]
        return f"{raw.where} overlays card '{base}', but no card has that name{_suggest(base, self.names())}"

    def _load(self, name: str, *, chain: tuple[str, ...]) -> AssetCard:
        if name in chain:
            cycle = " -> ".join([*chain, name])
            raise AssetError(f"card base cycle: {cycle} ({self._cards[name].file})")
        raw = self._cards.get(name)
        if raw is None:
            if chain:
                referrer = self._cards[chain[-1]]
                raise AssetError(f"{referrer.where} has base '{name}', but no card has that name")
            raise AssetError(self.missing_message(name))
        layers = [raw]
        overlay = self._cards.get(name + USER_SUFFIX)
        if overlay is not None:
            layers.append(overlay)
        # The overlay may change `base`, so read it from the merged layers.
        own: dict[str, Any] = {}
        for layer in layers:
            own = _deep_merge(own, layer.fields)
        sources = tuple(layers)
        base_name = own.pop("base", None)
        if base_name is not None:
            base = self._load(base_name, chain=(*chain, name))
            own = _deep_merge(base.fields, own)
            sources = sources + base.sources
        own["name"] = name
        return AssetCard(name=name, fields=own, sources=sources)


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if close:
        return f"; did you mean {', '.join(repr(c) for c in close)}? (`ft assets list` shows all)"
    return "; `ft assets list` shows the known cards"


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _card_files(directory: Path) -> Iterator[Path]:
    if not directory.is_dir():
        return
    for path in sorted(directory.rglob("*")):
        if path.suffix in (".yaml", ".yml") and path.is_file():
            yield path


def _read_dir(directory: Path) -> dict[str, RawCard]:
    cards: dict[str, RawCard] = {}
    for file in _card_files(directory):
        for raw in read_card_file(file):
            if raw.name in cards:
                raise AssetError(
                    f"card '{raw.name}' is defined twice in {directory}: "
                    f"in {cards[raw.name].file} and in {raw.file}"
                )
            cards[raw.name] = raw
    return cards


def read_card_file(file: Path) -> list[RawCard]:
    """Every card document in `file`, type-checked, with paths made absolute."""
    try:
        documents = list(yaml.safe_load_all(file.read_text()))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else str(file)
        raise AssetError(f"{where}: invalid YAML in asset card ({getattr(error, 'problem', error)})") from None
    cards = []
    for index, document in enumerate(documents):
        if document is None:
            continue
        where = f"{file} (document {index + 1})"
        if not isinstance(document, dict):
            raise AssetError(f"{where}: an asset card must be a mapping, got {type(document).__name__}")
        if "name" not in document:
            raise AssetError(f"{where}: asset card has no 'name' field")
        for key, value in document.items():
            expected = FIELD_TYPES.get(key)
            if expected is None:
                raise AssetError(f"{where}: card '{document['name']}' has an unknown field {str(key)[:60]!r}"
                                 f"{_closest_field(str(key))}")
            if not isinstance(value, expected):
                names = " or ".join(t.__name__ for t in expected)
                raise AssetError(
                    f"{where}: card '{document['name']}' field '{key}' must be a {names}, "
                    f"got {type(value).__name__} ({short_repr(value)})"
                )
        fields = dict(document)
        for key in PATH_FIELDS:
            if key in fields and "://" not in fields[key]:
                path = Path(fields[key]).expanduser()
                fields[key] = str(path if path.is_absolute() else (file.parent / path).resolve())
        cards.append(RawCard(name=document["name"], fields=fields, file=file))
    return cards


def _closest_field(key: str) -> str:
    close = difflib.get_close_matches(key, list(FIELD_TYPES), n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; known fields: {', '.join(FIELD_TYPES)}"


def _resolve_hub_uri(uri: str) -> Path | None:
    """`hf://org/repo[/sub/path]` -> the local Hugging Face cache snapshot, if downloaded."""
    scheme, _, rest = uri.partition("://")
    if scheme != "hf":
        return None
    parts = rest.split("/")
    if len(parts) < 2:
        return None
    repo, sub = "--".join(parts[:2]), parts[2:]
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = (hub.expanduser() / f"models--{repo}" / "snapshots")
    if not snapshots.is_dir():
        return None
    for snapshot in sorted(snapshots.iterdir(), reverse=True):
        candidate = snapshot.joinpath(*sub)
        if candidate.exists():
            return candidate
    return None
