"""`Registry`: the one mechanism behind every named choice in ft.

CLI verbs, model families and their archs, tokenizer families, data formats,
metric recorders and learning-rate schedules are each a `Registry`: a plain dict
filled by explicit `register(name, obj)` calls in one place. Registering a name
twice is a bug (ValueError); looking up an unknown name is a user mistake
(ConfigError) that lists the registered choices and the closest one.
"""

from __future__ import annotations

import difflib
from typing import Generic, Iterator, TypeVar

from ft.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object, for one kind of thing (`kind` names it in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj
        return obj

    def unregister(self, name: str) -> None:
        """Remove `name` (tests that register a temporary entry clean up with this)."""
        self._entries.pop(name, None)

    def get(self, name: str, *, key: str | None = None) -> T:
        """The entry named `name`; a ConfigError naming `key` (the config key or card
        field the name came from, if any) and the registered choices on a miss."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ConfigError(self.unknown_message(name, key=key)) from None

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def unknown_message(self, name: object, *, key: str | None = None) -> str:
        where = f"config key '{key}': " if key else ""
        close = difflib.get_close_matches(str(name), list(self._entries), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{where}unknown {self.kind} {name!r}{hint}; registered: {', '.join(self.names())}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
