"""Row formats: one JSONL row -> a tokenized `Example` (training) or `PromptRow` (generation).

Supported rows, detected per row from their keys (or forced with `format=`);
each format is registered in `DATA_FORMATS` by `register_data_formats`:

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
from typing import Any, Callable, Protocol, Sequence

from ft.errors import ConfigError, DataError
from ft.registry import Registry

# "Detect the format of each row from its keys": valid wherever a format name is.
AUTO = "auto"

# `dataset_family` values on asset cards (fairseq2's names) that mean one of our formats.
_FORMAT_ALIASES = {
    "generic_instruction": "src_tgt",  # fairseq2's family for src/tgt rows
    "instruction": "src_tgt",
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


def normalize_format(name: str | None, *, key: str | None = None) -> str | None:
    """Map a `format`/`dataset_family` value to a registered format name; None (and
    `auto`) mean detect per row. An unknown name is a DataError listing the formats
    (naming `key`, the config key or card field it came from, when given)."""
    if name is None or name == AUTO:
        return None
    name = _FORMAT_ALIASES.get(name, name)
    if name not in DATA_FORMATS:
        raise DataError(unknown_format_message(name, key=key))
    return name


def unknown_format_message(name: object, *, key: str | None = None) -> str:
    """The registry's message for an unknown format, which also names `auto` and the aliases."""
    aliases = ", ".join(f"{alias} (= {target})" for alias, target in sorted(_FORMAT_ALIASES.items()))
    return f"{DATA_FORMATS.unknown_message(name, key=key)}; also: {AUTO} (detect per row), {aliases}"


def check_format_name(name: str, *, key: str) -> None:
    """A ConfigError naming config key `key` when `name` is neither `auto`, a format nor an alias."""
    try:
        normalize_format(name, key=key)
    except DataError as error:
        raise ConfigError(str(error)) from None


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


@dataclass(frozen=True)
class RowFormat:
    """How rows of one format become training examples and generation prompts.

    `to_example(row, tokenizer)` -> Example; `to_prompt(row, tokenizer)` ->
    (prompt text, prompt ids, reference answer or None).
    """

    to_example: Callable[[dict[str, Any], DataTokenizer], Example]
    to_prompt: Callable[[dict[str, Any], DataTokenizer], tuple[str, list[int], str | None]]


# A template renders a non-chat row into (prompt text, target text); the target is
# required for training and optional (the reference) for generation.
RowTemplate = Callable[[dict[str, Any], bool], tuple[str, str | None]]


def templated(render: RowTemplate) -> RowFormat:
    """The format of rows rendered by `render`: loss on the target only."""

    def to_example(row: dict[str, Any], tokenizer: DataTokenizer) -> Example:
        prompt, target = render(row, True)
        prompt_ids = tokenizer.encode_prompt(prompt)
        target_ids = tokenizer.encode_response(target)
        return Example(prompt_ids + target_ids, [False] * len(prompt_ids) + [True] * len(target_ids))

    def to_prompt(row: dict[str, Any], tokenizer: DataTokenizer) -> tuple[str, list[int], str | None]:
        prompt, target = render(row, False)
        return prompt, tokenizer.encode_prompt(prompt), target

    return RowFormat(to_example, to_prompt)


def _src_tgt(row: dict[str, Any], need_target: bool) -> tuple[str, str | None]:
    return _text(row, "src", required=True), _text(row, "tgt", required=need_target)


def _gsm8k(row: dict[str, Any], need_target: bool) -> tuple[str, str | None]:
    return _text(row, "question", required=True) + "\n", _text(row, "answer", required=need_target)


def _alpaca_template(input_key: str, target_key: str) -> RowTemplate:
    def render(row: dict[str, Any], need_target: bool) -> tuple[str, str | None]:
        instruction = _text(row, "instruction", required=True)
        extra = _text(row, input_key, required=False)
        if extra:
            prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
        else:
            prompt = ALPACA_PROMPT.format(instruction=instruction)
        return prompt, _text(row, target_key, required=need_target)

    return render


def _chat_example(row: dict[str, Any], tokenizer: DataTokenizer) -> Example:
    ids, mask = _encode_chat(tokenizer, _messages(row))
    if len(ids) != len(mask):
        raise ValueError(f"tokenizer.encode_chat returned {len(ids)} ids but {len(mask)} mask values")
    return Example(list(ids), [bool(m) for m in mask])


def _chat_prompt(row: dict[str, Any], tokenizer: DataTokenizer) -> tuple[str, list[int], str | None]:
    messages = _messages(row)
    reference = None
    if messages[-1]["role"] == "assistant":
        reference = messages[-1]["content"]
        messages = messages[:-1]
    if not messages:
        raise RowError("'messages' holds only an assistant turn; there is nothing to prompt with")
    ids, _ = _encode_chat(tokenizer, messages, add_generation_prompt=True)
    return tokenizer.decode(ids), list(ids), reference


def register_data_formats(formats: Registry[RowFormat]) -> None:
    formats.register("src_tgt", templated(_src_tgt))
    formats.register("chat", RowFormat(_chat_example, _chat_prompt))
    formats.register("alpaca", templated(_alpaca_template("input", "output")))
    formats.register("dolly", templated(_alpaca_template("context", "response")))
    formats.register("gsm8k", templated(_gsm8k))


DATA_FORMATS: Registry[RowFormat] = Registry("dataset format")
register_data_formats(DATA_FORMATS)


def row_to_example(row: dict[str, Any], tokenizer: DataTokenizer, fmt: str | None = None) -> Example:
    """Tokenize one training row; loss only on the response / assistant turns."""
    return DATA_FORMATS.get(fmt or detect_format(row)).to_example(row, tokenizer)


def row_to_prompt(
    row: dict[str, Any], tokenizer: DataTokenizer, index: int, fmt: str | None = None
) -> PromptRow:
    """The prompt-only view of a row, for generation; the target becomes the reference."""
    fmt = fmt or detect_format(row, need_target=False)
    row_id = row.get("id")
    row_id = str(row_id) if isinstance(row_id, (str, int)) and not isinstance(row_id, bool) else str(index)
    text, ids, reference = DATA_FORMATS.get(fmt).to_prompt(row, tokenizer)
    return PromptRow(row_id, text, ids, reference)
