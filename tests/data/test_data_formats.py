"""Row formats -> Example (target masks) and -> PromptRow (generation view)."""

from __future__ import annotations

import pytest

from ft.data.formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_WITH_INPUT,
    DATA_FORMATS,
    RowError,
    detect_format,
    normalize_format,
    row_to_example,
    row_to_prompt,
)
from ft.errors import DataError


def _split(example, tok):
    """(prompt text, target text) from an Example's mask, checking the mask is prompt-then-target."""
    first = example.target_mask.index(True)
    assert all(example.target_mask[first:]), "targets must be one contiguous tail"
    assert not any(example.target_mask[:first])
    return tok.decode(example.tokens[:first]), example.tokens[first:]


def test_src_tgt(tok):
    ex = row_to_example({"src": "Q: 2+2?", "tgt": "4"}, tok)
    assert ex.tokens == [tok.bos_id] + tok.encode("Q: 2+2?") + tok.encode("4") + [tok.eos_id]
    prompt, target = _split(ex, tok)
    assert prompt == "Q: 2+2?" and target == tok.encode("4") + [tok.eos_id]
    assert ex.num_target_tokens == 2


def test_alpaca_with_and_without_input(tok):
    ex = row_to_example({"instruction": "Add.", "input": "2 and 2", "output": "4"}, tok)
    prompt, target = _split(ex, tok)
    assert prompt == ALPACA_PROMPT_WITH_INPUT.format(instruction="Add.", input="2 and 2")
    assert target == tok.encode_response("4")
    ex = row_to_example({"instruction": "Say hi.", "input": "", "output": "hi"}, tok)
    prompt, target = _split(ex, tok)
    assert prompt == ALPACA_PROMPT.format(instruction="Say hi.")
    assert prompt.endswith("### Response:\n")


def test_dolly_uses_context_as_input(tok):
    row = {"instruction": "Summarise.", "context": "Long text.", "response": "Short.", "category": "summarization"}
    assert detect_format(row) == "dolly"
    prompt, target = _split(row_to_example(row, tok), tok)
    assert prompt == ALPACA_PROMPT_WITH_INPUT.format(instruction="Summarise.", input="Long text.")
    assert target == tok.encode_response("Short.")


def test_gsm8k(tok):
    row = {"question": "What is 6*7?", "answer": "6*7 = <<6*7=42>>42\n#### 42"}
    prompt, target = _split(row_to_example(row, tok), tok)
    assert prompt == "What is 6*7?\n"
    assert tok.decode(target) == row["answer"] and target[-1] == tok.eos_id


def test_chat_loss_only_on_assistant_turns(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao"},
    ]
    ex = row_to_example({"messages": messages}, tok)
    targets = [t for t, m in zip(ex.tokens, ex.target_mask) if m]
    assert targets == tok.encode("Hello") + [tok.eot_id] + tok.encode("Ciao") + [tok.eot_id]
    assert len(ex.tokens) == len(ex.target_mask)


def test_forced_format_and_aliases():
    assert normalize_format("generic_instruction") == "src_tgt"
    assert normalize_format("auto") is None
    with pytest.raises(DataError, match="unknown dataset format 'parquet'.*alpaca"):
        normalize_format("parquet")


def test_unknown_format_lists_formats_auto_and_aliases():
    with pytest.raises(DataError) as info:
        normalize_format("dolli", key="dataset_format")
    assert str(info.value) == (
        "config key 'dataset_format': unknown dataset format 'dolli' (did you mean 'dolly'?); "
        "registered: alpaca, chat, dolly, gsm8k, src_tgt; also: auto (detect per row), "
        "generic_instruction (= src_tgt), instruction (= src_tgt)"
    )


def test_every_registered_format_reads_a_row_of_its_own(tok):
    rows = {
        "src_tgt": {"src": "a", "tgt": "b"},
        "chat": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        "alpaca": {"instruction": "a", "output": "b"},
        "dolly": {"instruction": "a", "response": "b"},
        "gsm8k": {"question": "a", "answer": "b"},
    }
    assert sorted(rows) == DATA_FORMATS.names()
    for name, row in rows.items():
        assert detect_format(row) == name
        example = row_to_example(row, tok, name)
        assert example.num_target_tokens > 0
        prompt = row_to_prompt(row, tok, 0, name)
        assert prompt.reference == "b"


def test_config_checks_the_format_name():
    from ft.config import build_config
    from ft.errors import ConfigError
    from ft.recipes.instruction_finetune_config import InstructionFinetuneConfig

    assert build_config(InstructionFinetuneConfig, overrides=["dataset_format=gsm8k"]).dataset_format == "gsm8k"
    assert build_config(InstructionFinetuneConfig, overrides=["dataset_format=instruction"]).dataset_format == "instruction"
    with pytest.raises(ConfigError, match=r"config key 'dataset_format': unknown dataset format 'csv'; registered: alpaca"):
        build_config(InstructionFinetuneConfig, overrides=["dataset_format=csv"])


@pytest.mark.parametrize(
    "row, match",
    [
        ({"text": "x"}, "no recognised fields \\(keys: text\\)"),
        ({"src": 3, "tgt": "x"}, "field 'src' must be a string, got int"),
        ({"instruction": "x", "output": ["a"]}, "field 'output' must be a string, got list"),
        ({"messages": "hi"}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, "messages\\[0\\].content must be a string, got missing"),
        ({"src": "only a prompt"}, "no recognised fields"),  # training needs a target
    ],
)
def test_bad_rows(tok, row, match):
    with pytest.raises(RowError, match=match):
        row_to_example(row, tok)


def test_prompt_view_of_each_format(tok):
    p = row_to_prompt({"src": "Translate: chat", "tgt": "cat", "id": "r7"}, tok, index=0)
    assert (p.id, p.prompt_text, p.reference) == ("r7", "Translate: chat", "cat")
    assert p.prompt_tokens == tok.encode_prompt("Translate: chat")

    p = row_to_prompt({"src": "no target"}, tok, index=3)
    assert p.id == "3" and p.reference is None

    p = row_to_prompt({"question": "1+1?", "answer": "#### 2"}, tok, index=0)
    assert p.prompt_text == "1+1?\n" and p.reference == "#### 2"

    p = row_to_prompt({"instruction": "Name a colour.", "output": "red"}, tok, index=0)
    assert p.prompt_text == ALPACA_PROMPT.format(instruction="Name a colour.") and p.reference == "red"

    p = row_to_prompt({"instruction": "Summarise.", "context": "Text."}, tok, index=0)
    assert "### Input:\nText." in p.prompt_text and p.reference is None


def test_chat_prompt_drops_final_assistant_turn_and_adds_generation_prompt(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    p = row_to_prompt({"messages": messages}, tok, index=0)
    assert p.reference == "Hello"
    ids, _ = tok.encode_chat(messages[:1], add_generation_prompt=True)
    assert p.prompt_tokens == ids
    assert p.prompt_text.endswith("<assistant>\n") and "Hello" not in p.prompt_text

    p = row_to_prompt({"messages": messages[:1]}, tok, index=0)
    assert p.reference is None and p.prompt_tokens == ids
