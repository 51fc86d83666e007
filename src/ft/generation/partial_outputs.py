"""Generation outputs written as they complete, so a killed `ft lm generate` keeps
what it finished and a re-run of the same command continues where it stopped.

While a rank generates, each finished prompt is appended to
`output/rank_K.partial.jsonl` (flushed and fsynced per batch of the generator);
its first line records the run's fingerprint (config hash), and every record its
row index and id. A re-run with the same fingerprint and rows reuses those records
and generates only the rest; anything else (another config, another dataset, a
torn last line) is set aside with a log line. At the end the records are written
in dataset order as `rank_K.jsonl` / `rank_K.txt` and the partial file is removed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("ft")


class PartialOutputs:
    """The finished records of one rank's rows, on disk as they complete."""

    def __init__(self, out_dir: Path, rank: int, *, row_ids: Sequence[str], fingerprint: str) -> None:
        self.path = out_dir / f"rank_{rank}.partial.jsonl"
        self.row_ids = list(row_ids)
        self.fingerprint = fingerprint
        self.records: dict[int, dict[str, Any]] = self._read()
        out_dir.mkdir(parents=True, exist_ok=True)
        # Rewrite what is kept (drops a torn last line), then append from there.
        self._file = open(self.path, "w", encoding="utf-8")
        self._file.write(json.dumps({"ft_partial_outputs": fingerprint}) + "\n")
        for index in sorted(self.records):
            self._file.write(json.dumps({"index": index, **self.records[index]}, ensure_ascii=False) + "\n")
        self.sync()

    def _read(self) -> dict[int, dict[str, Any]]:
        if not self.path.is_file():
            return {}
        records: dict[int, dict[str, Any]] = {}
        with open(self.path, encoding="utf-8") as file:
            lines = file.read().split("\n")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            header = {}
        if header.get("ft_partial_outputs") != self.fingerprint:
            log.warning("%s is from another config; generating every prompt again", self.path)
            return {}
        for line in lines[1:]:
            try:
                record = json.loads(line)
                index = record.pop("index")
            except (json.JSONDecodeError, KeyError, AttributeError):
                continue  # the torn last line of a killed run, or an empty one
            if not (isinstance(index, int) and 0 <= index < len(self.row_ids) and record.get("id") == self.row_ids[index]):
                log.warning("%s does not match the dataset's rows; generating every prompt again", self.path)
                return {}
            records[index] = record
        if records:
            log.info("continuing: %d of %d prompts already generated (%s)", len(records), len(self.row_ids), self.path)
        return records

    def pending(self) -> list[int]:
        """Indices of the rows still to generate, in order."""
        return [i for i in range(len(self.row_ids)) if i not in self.records]

    def add(self, index: int, record: dict[str, Any]) -> None:
        self.records[index] = record
        self._file.write(json.dumps({"index": index, **record}, ensure_ascii=False) + "\n")

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def finish(self) -> list[dict[str, Any]]:
        """Every record in row order; the partial file is removed (call after writing the final files)."""
        self.close()
        missing = self.pending()
        if missing:
            raise RuntimeError(f"rows {missing[:5]} were never generated")
        return [self.records[i] for i in range(len(self.row_ids))]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()
