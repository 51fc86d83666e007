"""Reading JSONL files: one JSON object per line, errors that name `file:line`.

Blank lines are allowed (many tools write a trailing newline or two); anything
else that is not a JSON object is a malformed line. Whether a malformed line
stops the run or is skipped is the caller's choice (`skip_malformed`), so this
module reports problems as `MalformedLine` values and never decides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ft.errors import DataError


@dataclass(frozen=True)
class MalformedLine:
    """A line that could not be used, with where it was and why."""

    path: Path
    line: int  # 1-based
    reason: str

    def message(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | MalformedLine]]:
    """Yield `(line_number, row)` for each non-blank line of `path`.

    `row` is the parsed object, or a `MalformedLine` when the line is not valid
    JSON or not a JSON object. Line numbers are 1-based, as editors show them.
    """
    try:
        f = open(path, "rb")
    except OSError as err:
        raise DataError(f"cannot open dataset file {path}: {err.strerror}") from err
    with f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield line_no, MalformedLine(path, line_no, f"not valid UTF-8 ({err.reason} at byte {err.start})")
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                yield line_no, MalformedLine(path, line_no, f"not valid JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(obj, dict):
                yield line_no, MalformedLine(
                    path, line_no, f"expected a JSON object per line, got a JSON {_json_type(obj)}"
                )
                continue
            yield line_no, obj


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"
