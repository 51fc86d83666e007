"""Row formats: one JSONL row -> a tokenized `Example` (training) or `PromptRow` (generation).

Supported rows, detected per row from their keys (or forced with `format=`):

| format    | fields                                    | prompt                           | target   |
|-----------|-------------------------------------------|----------------------------------|----------|
| `src_tgt` | `src`, `tgt` (fairseq2's instruction rows)| `src` as is                      | `tgt`    |
| `chat`    | `messages`: [{role, content}, ...]        | the tokenizer's chat template    | assistant turns |
| `alpaca`  | `instruction`, `input` (optional), `output` | Alpaca template (below)        | `output` |
| `dolly`   | `instruction`, `context` (optional), `response` | Alpaca template, context as input | `response` |
| `gsm8k`   | `question`, `answer`                      | `question + "\\n"`               | `answer` |

The Alpaca template is Stanford Alpaca's, with a newline after `### Response:`
(as torchtune does) so the prompt/target boundary falls on a newline for every
tokenizer. GSM8K's prompt is the bare question and a newline: the model learns
the worked solution ending in `#### N`, and the generate recipe scores against
`answer`. `src`/`tgt` rows are used verbatim: fairseq2 users put any template in
`src` themselves.

Tokenization: prompt ids are `tok.encode_prompt(prompt)` (BOS + prompt), target
ids `tok.encode_response(target)` (target + EOS/EOT); chat rows use
`tok.encode_chat(messages)`, whose mask marks the assistant turns.

`Example` holds plain Python lists (not tensors): the reader shuffles, packs and
collates them into tensors per micro-batch, and lists are cheaper to slice and
pickle than many small tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from ft.errors import DataError

FORMATS = ("src_tgt", "chat", "alpaca", "dolly", "gsm8k")

# `dataset_family` values on asset cards that name one of our formats.
_FORMAT_ALIASES = {
    "generic_instruction": "src_tgt",  # fairseq2's family for src/tgt rows
    "instruction": "src_tgt",
    "auto": None,
}

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class DataTokenizer(Protocol):
    """The part of `ft.tokenizers.Tokenizer` that the data pipeline uses."""

    def encode_prompt(self, source: str) -> list[int]: ...

    def encode_response(self, target: str) -> list[int]: ...

    def encode_chat(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True, slots=True)
class Example:
    """One tokenized training document.

    `target_mask[t]` is True where token t is part of the response (gets loss).
    Token 0 can never be predicted, so it never counts as a target.
    """

    tokens: list[int]
    target_mask: list[bool]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_target_tokens(self) -> int:
        """Tokens that receive a loss: targets that have a preceding token."""
        return sum(self.target_mask[1:])


@dataclass(frozen=True, slots=True)
class PromptRow:
    """One generation prompt: its id, text, token ids and reference answer (if any)."""

    id: str
    prompt_text: str
    prompt_tokens: list[int]
    reference: str | None


class RowError(Exception):
    """A row that does not fit its format; the caller adds file and line."""


def normalize_format(name: str | None) -> str | None:
    """Map a `format`/`dataset_family` value to a format name; None means detect per row."""
    if name is None:
        return None
    if name in FORMATS:
        return name
    if name in _FORMAT_ALIASES:
        return _FORMAT_ALIASES[name]
    known = ", ".join(list(FORMATS) + sorted(k for k in _FORMAT_ALIASES if k != "auto"))
    raise DataError(f"unknown dataset format {name!r}; known formats: auto, {known}")


def detect_format(row: dict[str, Any], *, need_target: bool = True) -> str:
    """The format of `row` from its keys. Without `need_target`, prompt-only rows qualify."""
    if "messages" in row:
        return "chat"
    if "src" in row and ("tgt" in row or not need_target):
        return "src_tgt"
    if "question" in row and ("answer" in row or not need_target):
        return "gsm8k"
    if "instruction" in row:
        if "response" in row or "context" in row:
            if "response" in row or not need_target:
                return "dolly"
        elif "output" in row or not need_target:
            return "alpaca"
    keys = ", ".join(sorted(row)) or "none"
    raise RowError(
        f"no recognised fields (keys: {keys}); expected src/tgt, messages (chat), "
        "instruction/input/output (alpaca), instruction/context/response (dolly) "
        "or question/answer (gsm8k)"
    )


def _text(row: dict[str, Any], key: str, *, required: bool) -> str | None:
    if key not in row or (not required and row[key] is None):
        if required:
            raise RowError(f"missing field {key!r}")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _messages(row: dict[str, Any]) -> list[dict[str, str]]:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise RowError("field 'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowError(f"messages[{i}] must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if key not in m else type(m[key]).__name__
                raise RowError(f"messages[{i}].{key} must be a string, got {got}")
    return messages


def _encode_chat(
    tokenizer: DataTokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    # The tokenizer checks what its template accepts (roles, order); its DataError
    # becomes a RowError so the message gains the file and line of the row.
    try:
        return tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    except DataError as err:
        raise RowError(str(err)) from None


def _prompt_and_target(row: dict[str, Any], fmt: str, *, need_target: bool) -> tuple[str, str | None]:
    """Render a non-chat row into (prompt text, target text)."""
    if fmt == "src_tgt":
        return _text(row, "src", required=True), _text(row, "tgt", required=need_target)
    if fmt == "gsm8k":
        return _text(row, "question", required=True) + "\n", _text(row, "answer", required=need_target)
    if fmt in ("alpaca", "dolly"):
        input_key, target_key = ("input", "output") if fmt == "alpaca" else ("context", "response")
        instruction = _text(row, "instruction", required=True)
        extra = _text(row, input_key, required=False)
        if extra:
            prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
        else:
            prompt = ALPACA_PROMPT.format(instruction=instruction)
        return prompt, _text(row, target_key, required=need_target)
    raise AssertionError(fmt)


def row_to_example(row: dict[str, Any], tokenizer: DataTokenizer, fmt: str | None = None) -> Example:
    """Tokenize one training row; loss only on the response / assistant turns."""
    fmt = fmt or detect_format(row)
    if fmt == "chat":
        ids, mask = _encode_chat(tokenizer, _messages(row))
        if len(ids) != len(mask):
            raise ValueError(f"tokenizer.encode_chat returned {len(ids)} ids but {len(mask)} mask values")
        return Example(list(ids), [bool(m) for m in mask])
    prompt, target = _prompt_and_target(row, fmt, need_target=True)
    prompt_ids = tokenizer.encode_prompt(prompt)
    target_ids = tokenizer.encode_response(target)
    return Example(prompt_ids + target_ids, [False] * len(prompt_ids) + [True] * len(target_ids))


def row_to_prompt(
    row: dict[str, Any], tokenizer: DataTokenizer, index: int, fmt: str | None = None
) -> PromptRow:
    """The prompt-only view of a row, for generation; the target becomes the reference."""
    fmt = fmt or detect_format(row, need_target=False)
    row_id = row.get("id")
    row_id = str(row_id) if isinstance(row_id, (str, int)) and not isinstance(row_id, bool) else str(index)
    if fmt == "chat":
        messages = _messages(row)
        reference = None
        if messages[-1]["role"] == "assistant":
            reference = messages[-1]["content"]
            messages = messages[:-1]
        if not messages:
            raise RowError("'messages' holds only an assistant turn; there is nothing to prompt with")
        ids, _ = _encode_chat(tokenizer, messages, add_generation_prompt=True)
        return PromptRow(row_id, tokenizer.decode(ids), list(ids), reference)
    prompt, target = _prompt_and_target(row, fmt, need_target=False)
    return PromptRow(row_id, prompt, tokenizer.encode_prompt(prompt), target)
