"""The target-mask guard: a training split whose masks are empty everywhere, or cover
every token, stops the run before training with a message naming the dataset; a normal chat split
(Qwen's ChatML, assistant turns only) passes."""

from __future__ import annotations

import json

import pytest

from ft.data import read_examples
from ft.data.target_mask_guard import check_target_masks
from ft.errors import DataError
from ft.tokenizers import load_tokenizer

pytest.importorskip("tokenizers")
from qwen_tokenizer_helpers import train_qwen_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(str(train_qwen_tokenizer(tmp_path_factory.mktemp("qwen"))))


def examples(tmp_path, tokenizer, rows):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_examples(str(path), tokenizer, split=None)


def test_assistant_turns_pass(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}] * 3
    check_target_masks(examples(tmp_path, tokenizer, rows))


def test_no_assistant_turn_anywhere_is_an_error(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "Hi"}]}] * 3
    with pytest.raises(DataError, match="no usable examples: 3 rows, 3 without target tokens"):
        examples(tmp_path, tokenizer, rows)  # read_examples drops them and says so


def test_mask_over_every_token_is_an_error(tmp_path, tokenizer):
    rows = [{"src": "", "tgt": "Hello there"}] * 3  # Qwen has no BOS: an empty prompt leaves only targets
    with pytest.raises(DataError, match="covers every token of the first 3 examples"):
        check_target_masks(examples(tmp_path, tokenizer, rows))
