"""Scoring responses against reference answers: GSM8K-style final-answer
extraction, number normalisation and exact match.

GSM8K references end in `#### <answer>`; a model fine-tuned on them writes its
answer the same way. Two answer metrics, as lm-evaluation-harness reports them:

- strict: the number right after the last `####` of the response;
- flexible: that, else the number after "answer is", else the last number anywhere.

Numbers are compared after normalisation: `1,234.50`, `$1234.5` and `+1234.500` are
all `1234.5`. Exact match compares whitespace-normalised text.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from typing import Iterable

# A number as people write it: optional sign and currency, thousands separators,
# decimals. Unicode minus (U+2212) counts as a sign.
_NUMBER = re.compile(
    r"(?P<sign>[-+\u2212]?)\s*\$?\s*(?P<digits>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
)
_FINAL_MARK = "####"
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*", re.IGNORECASE)


def normalize_number(text: str) -> str | None:
    """The first number of `text` in canonical form (no commas, no trailing zeros,
    `-` for negatives, `0` for minus zero), or None when there is none."""
    match = _NUMBER.search(text)
    return _canonical(match) if match else None


def _canonical(match: re.Match[str]) -> str | None:
    try:
        value = Decimal(match.group("digits").replace(",", ""))
    except InvalidOperation:
        return None
    if match.group("sign") in ("-", "\u2212"):
        value = -value
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def _last_number(text: str) -> str | None:
    matches = list(_NUMBER.finditer(text))
    return _canonical(matches[-1]) if matches else None


def extract_answer(response: str, *, flexible: bool = False) -> str | None:
    """The final answer of a response as a canonical number, or None (malformed).

    Strict: the number right after the last `####` (only whitespace between them).
    Flexible: the strict answer, else the number after "answer is", else the last
    number in the response.
    """
    marker = response.rfind(_FINAL_MARK)
    if marker >= 0:
        match = _match_after_space(response, marker + len(_FINAL_MARK))
        if match is not None:
            return _canonical(match)
    if not flexible:
        return None
    answer_is = list(_ANSWER_IS.finditer(response))
    if answer_is:
        match = _match_after_space(response, answer_is[-1].end())
        if match is not None:
            return _canonical(match)
    return _last_number(response)


def _match_after_space(text: str, pos: int) -> re.Match[str] | None:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return _NUMBER.match(text, pos)


def extract_reference_answer(reference: str) -> str | None:
    """The answer of a reference: the number after its last `####`, or the whole
    reference when it is just a number (`"42"`, `"-1,000"`); None otherwise."""
    answer = extract_answer(reference)
    if answer is not None:
        return answer
    match = _NUMBER.fullmatch(reference.strip().rstrip("."))
    return _canonical(match) if match else None


def exact_match(response: str, reference: str) -> bool:
    """Equal after collapsing runs of whitespace and stripping both ends."""
    return " ".join(response.split()) == " ".join(reference.split())


@dataclass
class ScoreSummary:
    """Accuracy over the rows that carry a reference."""

    num_rows: int = 0
    """Rows scored (those with a reference)."""
    num_with_answer: int = 0
    """Rows whose reference holds a numeric final answer (the denominator of the accuracies)."""
    num_correct: int = 0
    num_correct_flexible: int = 0
    num_malformed: int = 0
    """Rows with a numeric reference whose response has no strict `#### N` answer."""
    num_exact_match: int = 0

    def add(self, response: str, reference: str) -> dict[str, object]:
        """Score one row; returns its per-row fields (for the output file)."""
        self.num_rows += 1
        row: dict[str, object] = {"exact_match": exact_match(response, reference)}
        self.num_exact_match += bool(row["exact_match"])
        expected = extract_reference_answer(reference)
        if expected is not None:
            self.num_with_answer += 1
            strict = extract_answer(response)
            flexible = extract_answer(response, flexible=True)
            row.update(answer=strict, expected_answer=expected, correct=strict == expected)
            self.num_correct += strict == expected
            self.num_correct_flexible += flexible == expected
            self.num_malformed += strict is None
        return row

    def merge(self, other: "ScoreSummary") -> "ScoreSummary":
        return ScoreSummary(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def metrics(self) -> dict[str, float | int | None]:
        def ratio(n: int, d: int) -> float | None:
            return n / d if d else None

        return {
            "num_rows": self.num_rows,
            "num_with_answer": self.num_with_answer,
            "accuracy": ratio(self.num_correct, self.num_with_answer),
            "accuracy_flexible": ratio(self.num_correct_flexible, self.num_with_answer),
            "malformed_rate": ratio(self.num_malformed, self.num_with_answer),
            "exact_match": ratio(self.num_exact_match, self.num_rows),
        }


def score_generations(pairs: Iterable[tuple[str, str | None]]) -> ScoreSummary:
    """Summary over (response, reference) pairs; pairs without a reference are skipped."""
    summary = ScoreSummary()
    for response, reference in pairs:
        if reference is not None:
            summary.add(response, reference)
    return summary
