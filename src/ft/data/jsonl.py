"""Reading JSONL files: one JSON object per line, errors that name `file:line`.

Blank lines are allowed (many tools write a trailing newline or two), and so is a
UTF-8 byte order mark at the start of a file; anything else that is not a JSON
object of valid Unicode is a malformed line: a lone UTF-16 surrogate (`"\\ud800"`),
nesting too deep for the parser, or a line longer than `MAX_LINE_BYTES` (measured
while reading, before anything parses or tokenizes it). Whether a malformed line
stops the run or is skipped is the caller's choice (`skip_malformed`), so this
module reports problems as `MalformedLine` values and never decides.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ft.errors import DataError

# Far above any example a model can train on (a million-token example is a few MB);
# a longer line is an error found before it is parsed or tokenized.
MAX_LINE_BYTES = 16 << 20
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


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
        for line_no, raw in enumerate(_bounded_lines(f), start=1):
            if raw is None:
                yield line_no, MalformedLine(path, line_no, f"line longer than {MAX_LINE_BYTES >> 20} MiB")
                continue
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte order mark
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
            except RecursionError:
                yield line_no, MalformedLine(path, line_no, "JSON nested too deeply")
                continue
            if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(obj):
                yield line_no, MalformedLine(path, line_no, "not valid Unicode (a lone UTF-16 surrogate such as \\ud800)")
                continue
            if not isinstance(obj, dict):
                yield line_no, MalformedLine(
                    path, line_no, f"expected a JSON object per line, got a JSON {_json_type(obj)}"
                )
                continue
            yield line_no, obj


def _bounded_lines(f) -> Iterator[bytes | None]:
    """The lines of binary file `f`; None for a line over MAX_LINE_BYTES, which is
    skipped without ever holding more than MAX_LINE_BYTES of it."""
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(MAX_LINE_BYTES)
            yield None
            continue
        yield line


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string in a parsed JSON value holds a surrogate code point (only
    a `\\uD800`-style escape can put one there; valid pairs decode to one character)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


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
