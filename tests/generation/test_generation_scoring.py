"""Answer scoring: GSM8K final-answer extraction on hand-written completions (right,
wrong, malformed, commas, signs, decimals), exact match, the summary metrics, and
every reference of the real GSM8K test set (when it is present)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ft.generation import ScoreSummary, exact_match, extract_answer, extract_reference_answer, normalize_number, score_generations

GSM8K_TEST = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "test.jsonl"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("42", "42"), ("1,234", "1234"), ("1,234.50", "1234.5"), ("-7", "-7"), ("+3", "3"), ("\u22122", "-2"),
        ("$1,000,000", "1000000"), ("0.50", "0.5"), (".5", "0.5"), ("3.0", "3"), ("-0", "0"), ("about 12 eggs", "12"),
        ("no number", None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    "response, strict, flexible",
    [
        ("She makes 9 * 2 = $18.\n#### 18", "18", "18"),  # right format
        ("#### 70,000", "70000", "70000"),  # thousands separators
        ("The loss is 5 - 8 = -3\n#### -3", "-3", "-3"),  # negative
        ("#### 2.50.", "2.5", "2.5"),  # decimal, trailing period
        ("#### $1,200", "1200", "1200"),  # currency
        ("first #### 3 then #### 4", "4", "4"),  # the last marker counts
        ("The answer is 12 apples.", None, "12"),  # malformed for strict, readable for flexible
        ("I think 3 + 4 = 7", None, "7"),  # last number
        ("#### twelve", None, None),  # malformed: no number after the marker nor anywhere
        ("", None, None),
    ],
)
def test_extract_answer(response, strict, flexible):
    assert extract_answer(response) == strict
    assert extract_answer(response, flexible=True) == flexible


def test_extract_reference_answer():
    assert extract_reference_answer("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18") == "18"
    assert extract_reference_answer("1,000") == "1000"
    assert extract_reference_answer("-4.") == "-4"
    assert extract_reference_answer("Paris") is None
    assert extract_reference_answer("3 apples") is None  # not just a number: exact match only


def test_exact_match_normalizes_whitespace_only():
    assert exact_match("  The  cat\nsat ", "The cat sat")
    assert not exact_match("the cat sat", "The cat sat")


def test_score_summary_on_hand_written_completions():
    pairs = [
        ("so #### 18", "9 * 2 = 18\n#### 18"),  # right
        ("so #### 17", "9 * 2 = 18\n#### 18"),  # wrong
        ("the answer is 18", "9 * 2 = 18\n#### 18"),  # malformed for strict, right for flexible
        ("#### 1,600", "#### 1600"),  # right, with a comma
        ("#### -5", "#### 5"),  # sign matters
        ("Paris", "Paris"),  # no numeric reference: exact match only
        ("ignored", None),  # no reference: not scored
    ]
    summary = score_generations(pairs)
    metrics = summary.metrics()
    assert metrics["num_rows"] == 6 and metrics["num_with_answer"] == 5
    assert metrics["accuracy"] == pytest.approx(2 / 5)
    assert metrics["accuracy_flexible"] == pytest.approx(3 / 5)
    assert metrics["malformed_rate"] == pytest.approx(1 / 5)
    assert metrics["exact_match"] == pytest.approx(1 / 6)
    row = ScoreSummary().add("#### 1,600", "#### 1600")
    assert row == {"exact_match": False, "answer": "1600", "expected_answer": "1600", "correct": True}
    merged = summary.merge(summary)
    assert merged.metrics()["accuracy"] == metrics["accuracy"] and merged.num_rows == 12
    assert ScoreSummary().metrics()["accuracy"] is None


@pytest.mark.skipif(not GSM8K_TEST.is_file(), reason=f"{GSM8K_TEST} is absent")
def test_every_gsm8k_test_reference_parses():
    rows = [json.loads(line) for line in GSM8K_TEST.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) > 1000
    for i, row in enumerate(rows):
        answer = extract_reference_answer(row["answer"])
        assert answer is not None, f"line {i + 1}: {row['answer'][-40:]!r}"
        # What follows '####' is the whole answer: the canonical form is its digits, no commas.
        raw = row["answer"].rsplit("####", 1)[1].strip()
        assert answer == raw.replace(",", ""), f"line {i + 1}: {raw!r} -> {answer!r}"
        # A perfect model's completion (the reference itself) is scored correct.
        assert ScoreSummary().add(row["answer"], row["answer"])["correct"] is True
