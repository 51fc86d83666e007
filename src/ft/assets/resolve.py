"""Reading a `model=` / `tokenizer=` / `dataset=` value: an asset card name or a path.

The one rule, for every kind of asset: a value is a path when it is explicitly one,
that is when it

- is an `os.PathLike`,
- contains a path separator (`/`, or the platform's own),
- starts with `.` or `~` (`./train.jsonl`, `~/ckpt`), or
- names something that exists on disk (relative to the working directory);

everything else is a card name, including `x@user` (card `x` with its user
overlay). `train.jsonl` with no such file is therefore a card name; the error for
a missing card says how to write it as a path.
"""

from __future__ import annotations

import os
from pathlib import Path

from ft.assets.store import AssetCard, AssetStore
from ft.errors import AssetError


def is_explicit_path(value: str | os.PathLike[str]) -> bool:
    """True when `value` is a path by the rule above, False when it is a card name."""
    if isinstance(value, os.PathLike):
        return True
    return (
        "/" in value
        or os.sep in value
        or (os.altsep is not None and os.altsep in value)
        or value.startswith((".", "~"))
        or Path(value).exists()
    )


def resolve_card_or_path(
    value: str | os.PathLike[str], *, what: str = "asset", store: AssetStore | None = None
) -> AssetCard | Path:
    """The existing path or the merged card that `value` names (see the module docstring).

    `what` ("dataset", "tokenizer", ...) starts the error messages. A path that does
    not exist, or a name that no card has, is an `AssetError`; `store` defaults to
    the user and system card directories.
    """
    if is_explicit_path(value):
        path = Path(value).expanduser()
        if not path.exists():
            raise AssetError(f"{what} path {path} does not exist")
        return path
    name = str(value)
    store = store if store is not None else AssetStore.default()
    if name not in store:
        hint = f" (for a file or directory of that name, write ./{name})" if Path(name).suffix else ""
        raise AssetError(
            f"{what} '{name}' is neither an existing file or directory nor a known asset card: "
            f"{store.missing_message(name)}{hint}"
        )
    return store.load(name)


__all__ = ["is_explicit_path", "resolve_card_or_path"]
